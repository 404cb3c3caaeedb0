"""The first handler a newcomer writes, ``return ("reply", message, state)``, keeps working.

With the defaults, pings and pongs do not reach ``handle`` (``control_messages``
is off), so a handler that echoes every message it gets never has to tell a
``Ping`` from data: neither a client's ping nor the answer to the server's
keepalive ping makes it return a reply the server cannot send. The
original's behaviour (pings and pongs delivered) is one option away.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from wsproto.events import CloseConnection, TextMessage
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong

from pywsserver import ConnectionClose, Ping, Pong, start_link

from .wstools import RawClient, in_client_thread, url

pytestmark = pytest.mark.anyio


class NaiveEcho:
    """Echoes whatever ``handle`` gets, as a newcomer's first handler does."""

    def init(self, options: dict[str, Any]) -> list[Any]:
        return options.get("seen", [])

    def handle(self, message: object, seen: list[Any]) -> tuple[Any, ...]:
        seen.append(message)
        return ("reply", message, seen)


def options(seen: list[Any], *websocket: tuple[str, Any]) -> list[tuple[str, Any]]:
    ws = [("handler_module", NaiveEcho), ("handler_options", {"seen": seen}), *websocket]
    return [("port", 0), ("worker_options", [("protocol_modules", [("websocket", ws)])])]


async def test_a_naive_echo_handler_survives_a_client_ping() -> None:
    seen: list[Any] = []
    async with start_link(options(seen)) as server:

        async def client(address: str) -> list[str]:
            from websockets.asyncio.client import connect

            async with connect(address, ping_interval=None) as ws:
                replies = []
                for index in range(3):
                    await (await ws.ping(b"are you there"))  # the pong came back
                    await ws.send(f"message {index}")
                    replies.append(str(await ws.recv()))
                return replies

        assert await in_client_thread(client, url(server)) == ["message 0", "message 1", "message 2"]
    assert [m for m in seen if not isinstance(m, ConnectionClose)] == ["message 0", "message 1", "message 2"]
    assert seen[-1] == ConnectionClose(1000, "")


async def test_a_naive_echo_handler_survives_the_servers_keepalive_pings() -> None:
    seen: list[Any] = []
    async with start_link(options(seen, ("ping_interval", 0.05), ("ping_timeout", 5.0))) as server:
        client = await RawClient.connect(server.port)
        for index in range(3):  # answer three keepalive pings, then check the connection still echoes
            event = await client.next_event(timeout=5)
            assert isinstance(event, WsPing), event
            await client.send(event.response())
            await client.send(TextMessage(data=f"after pong {index}"))
            event = await client.next_event(timeout=5)
            while isinstance(event, WsPing):  # a keepalive ping may come before the echo
                await client.send(event.response())
                event = await client.next_event(timeout=5)
            assert event == TextMessage(data=f"after pong {index}")
        await client.send(CloseConnection(code=1000))
        with anyio.fail_after(5):
            while not isinstance(event, CloseConnection):
                event = await client.next_event()
        await client.aclose()
    assert not any(isinstance(m, Ping | Pong) for m in seen)


async def test_control_messages_on_deliver_pings_and_pongs_as_the_original_did() -> None:
    seen: list[Any] = []

    class Recording(NaiveEcho):
        def handle(self, message: object, state: list[Any]) -> tuple[Any, ...]:
            state.append(message)
            return ("noreply", state) if isinstance(message, Ping | Pong) else ("reply", message, state)

    ws = [("handler_module", Recording), ("handler_options", {"seen": seen}), ("control_messages", True)]
    async with start_link([("port", 0), ("worker_options", [("protocol_modules", [("websocket", ws)])])]) as server:
        client = await RawClient.connect(server.port)
        await client.send(WsPing(payload=b"ping from the client"))
        assert await client.next_event() == WsPong(payload=b"ping from the client")
        await client.send(WsPong(payload=b"unsolicited"))
        await client.send(TextMessage(data="data"))
        assert await client.next_event() == TextMessage(data="data")
        await client.aclose()
    assert seen[:3] == [Ping(b"ping from the client"), Pong(b"unsolicited"), "data"]
