"""The testing tools users get (``pywsserver.testing``), tested as users would use them."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pywsserver import Accept, ConnectionClosed, NoReply, Ping, Pong, Reject, Reply, SendPing
from pywsserver.testing import Client, HandlerDriver, HandshakeRejected, serve_for_test

pytestmark = pytest.mark.anyio


class Greeter:
    """Greets by name from the query, refuses anonymous visitors, counts messages."""

    def handshake(self, info: dict[str, Any]) -> Any:
        if not info["query"].startswith("name="):
            return Reject(401, "who are you?")
        return Accept(headers=[("X-Greeter", "yes")])

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        options["worker"].join("greeted")
        return {"name": options["query"].removeprefix("name="), "count": 0, "worker": options["worker"]}

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        if isinstance(message, str):
            state["count"] += 1
            if message == "ping me":
                return ("ping", b"you", state)
            if message == "later":
                await state["worker"].send(f"later, {state['name']}")
                return ("noreply", state)
            return ("reply", f"hello {state['name']} ({state['count']})", state)
        return ("noreply", state)


async def test_serve_for_test_and_the_client() -> None:
    async with serve_for_test(Greeter) as server, await Client.connect(server, "/?name=ann") as client:
        assert client.response_headers["X-Greeter"] == "yes"
        await client.send("hi")
        assert await client.receive() == "hello ann (1)"
        await client.send("later")
        assert await client.receive() == "later, ann"
        assert await client.close() == (1000, "")
        with pytest.raises(ConnectionClosed):
            await client.receive()


async def test_the_client_sees_a_rejection_as_an_http_response() -> None:
    async with serve_for_test(Greeter) as server:
        with pytest.raises(HandshakeRejected) as refused:
            await Client.connect(server, "/")
        assert refused.value.status == 401
        assert refused.value.body == b"who are you?"


async def test_the_client_negotiates_compression_and_subprotocols() -> None:
    echo = serve_for_test("pywsserver.echo", websocket=[("subprotocols", ["b", "a"])])
    async with echo as server, await Client.connect(server, subprotocols=["a", "b"], compression=True) as client:
        assert client.subprotocol == "b"
        assert client.extensions == ["permessage-deflate"]
        await client.send(b"x" * 5000)
        assert await client.receive() == b"x" * 5000


async def test_serve_for_test_takes_complete_options_too() -> None:
    options = [
        ("port", 8080),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])]),
    ]
    async with serve_for_test(options=options) as server:
        assert server.port != 8080
        async with await Client.connect(server) as client:
            await client.send("echo")
            assert await client.receive() == "echo"


async def test_the_handler_driver_runs_a_handler_without_sockets() -> None:
    driver = HandlerDriver(Greeter, path="/", query="name=bob")
    assert await driver.handshake() == Accept(headers=(("X-Greeter", "yes"),))
    state = await driver.open()
    assert state["name"] == "bob"
    assert driver.worker.groups == {"greeted"}
    assert await driver.handle("hi") == Reply("hello bob (1)", driver.state)
    assert await driver.handle("ping me") == SendPing(b"you", driver.state)
    assert await driver.handle("later") == NoReply(driver.state)
    assert driver.worker.sent() == ["later, bob"]
    await driver.close()
    with pytest.raises(ConnectionClosed):
        await driver.handle("after the close")


async def test_the_handler_driver_reports_a_rejection_and_invalid_results() -> None:
    from pywsserver import InvalidHandlerResult

    assert await HandlerDriver(Greeter).handshake() == Reject(401, "who are you?")

    class Broken:
        def init(self, options: dict[str, Any]) -> None:
            return None

        def handle(self, message: Any, state: None) -> Any:
            return ("shout", state)

    driver = HandlerDriver(Broken)
    await driver.open()
    with pytest.raises(InvalidHandlerResult):
        await driver.handle("x")


class ForgotAsync:
    """A sync ``handle`` that returns a coroutine (its author forgot ``async def``)."""

    def init(self, options: dict[str, Any]) -> None:
        return None

    def handle(self, message: Any, state: None) -> Any:
        if message == "ok":
            return ("reply", "fine", state)
        return self._later(message)  # a coroutine: never awaited by a sync handler's caller

    async def _later(self, message: Any) -> tuple[str, None]:
        return ("noreply", None)


async def test_a_sync_handler_returning_a_coroutine_closes_its_connection_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="pywsserver"):
        async with serve_for_test(ForgotAsync) as server:
            async with await Client.connect(server) as client:
                await client.send("ok")
                assert await client.receive() == "fine"
                await client.send("oops")
                with pytest.raises(ConnectionClosed):
                    await client.receive()
                assert client.close_code == (1011, "internal error")
            async with await Client.connect(server) as client:  # the server serves on
                await client.send("ok")
                assert await client.receive() == "fine"
    assert "declare it 'async def'" in caplog.text


class SeesEverything:
    """Records every message ``handle`` gets in the list given as handler option ``seen``; echoes text."""

    def init(self, options: dict[str, Any]) -> list[Any]:
        seen: list[Any] = options["seen"]
        return seen

    def handle(self, message: Any, state: list[Any]) -> Any:
        state.append(message)
        return ("reply", message, state) if isinstance(message, str) else ("noreply", state)


@pytest.mark.parametrize("control_messages", [False, True])
async def test_the_driver_delivers_the_clients_pings_and_pongs_as_a_server_does(control_messages: bool) -> None:
    """A ping or pong from the client reaches ``handle`` only with ``control_messages`` on, as on a server."""
    from wsproto.events import Pong as WsPong

    on_server: list[Any] = []
    websocket = [("handler_options", {"seen": on_server}), ("control_messages", control_messages)]
    async with serve_for_test(SeesEverything, websocket=websocket) as server, await Client.connect(server) as client:
        await client.ping(b"are you there")
        await client._send(WsPong(payload=b"unsolicited"))
        await client.send("after them")
        assert await client.receive() == "after them"  # handled in order: the pings were too
        assert client.pongs == [b"are you there"]

    in_driver: list[Any] = []
    driver = HandlerDriver(SeesEverything, {"seen": in_driver}, control_messages=control_messages)
    await driver.open()
    ping_result = await driver.ping(b"are you there")
    pong_result = await driver.pong(b"unsolicited")
    assert await driver.handle("after them") == Reply("after them", in_driver)
    await driver.close()
    if control_messages:
        assert ping_result == NoReply(in_driver) and pong_result == NoReply(in_driver)
    else:
        assert ping_result is None and pong_result is None
    expected = [Ping(b"are you there"), Pong(b"unsolicited")] if control_messages else []
    assert on_server[:-1] == [*expected, "after them"]  # the last is the close notice
    assert in_driver == on_server
    with pytest.raises(ConnectionClosed):
        await driver.ping()
