"""Protocol behaviour over real sockets: handshake errors, protocol violations, limits, custom modules."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any, ClassVar

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect
from wsproto.events import CloseConnection, TextMessage

import pywsserver
from pywsserver import start_link
from pywsserver.protocols import Action, CloseSocket, ConnectionInfo, Effect, SendAction, Stop, Write

from .recorder import Recorder, server_options
from .wstools import RawClient, in_client_thread, raw_http, url

pytestmark = pytest.mark.anyio

HANDSHAKE = (
    "GET /chat?room=7 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
)


async def test_init_gets_the_worker_peer_path_query_and_headers() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port, "/chat/room%201?user=ann")
        await recorder.wait_for(lambda: len(recorder.inits) == 1)
        options = recorder.inits[0]
        assert options["worker"] is recorder.workers[0]
        assert options["peer"] == client.stream.extra(anyio.abc.SocketAttribute.local_address)
        assert options["local"] == ("127.0.0.1", server.port)
        assert options["path"] == "/chat/room 1"
        assert options["query"] == "user=ann"
        assert options["headers"]["host"] == f"127.0.0.1:{server.port}"
        assert options["recorder"] is recorder
        await client.aclose()


@pytest.mark.parametrize(
    ("request_bytes", "status", "header"),
    [
        (HANDSHAKE.format(version=8).encode(), b"426", b"Sec-WebSocket-Version: 13"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"426", b"Upgrade: websocket"),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", b"426", b"Upgrade: websocket"),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n", b"405", b"Allow: GET"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400", b"Connection: close"),
    ],
)
async def test_bad_handshakes_get_an_http_error_over_the_socket(
    request_bytes: bytes, status: bytes, header: bytes
) -> None:
    async with start_link(server_options()) as server:
        answer = await raw_http(server.port, request_bytes)
        assert answer.split(b" ")[1] == status
        assert header in answer
        assert server.connections == 0 or await _no_connections(server)


async def _no_connections(server: pywsserver.Server) -> bool:
    with anyio.fail_after(5):
        while server.connections:
            await anyio.lowlevel.checkpoint()
    return True


async def test_a_stalled_handshake_is_timed_out_while_others_connect() -> None:
    options = server_options(number_of_workers=1)
    options[-1] = (
        "worker_options",
        [
            (
                "protocol_modules",
                [("http", [("handshake_timeout", 0.3)]), ("websocket", [("handler_module", "pywsserver.echo")])],
            )
        ],
    )
    async with start_link(options) as server, await anyio.connect_tcp("127.0.0.1", server.port) as stalled:
        await stalled.send(b"GET / HTTP/1.1\r\n")  # and nothing more

        async def client() -> object:
            async with connect(url(server)) as ws:
                await ws.send("still served")
                return await ws.recv()

        assert await in_client_thread(client) == "still served"
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stalled.receive()


async def test_an_unmasked_frame_closes_1002_without_reaching_the_handler() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port)
        await client.send_raw(b"\x81\x05hello")  # clients must mask their frames
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1002
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.messages == []
        assert recorder.closes[0][1].code == 1002


async def test_invalid_utf8_in_a_text_frame_closes_1007() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port)
        mask = b"\x00\x00\x00\x00"
        await client.send_raw(b"\x81\x82" + mask + b"\xff\xfe")
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1007
        assert recorder.messages == []


async def test_a_message_over_max_message_size_closes_1009() -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("max_message_size", 1000)])
    async with start_link(options) as server:

        async def client() -> int | None:
            async with connect(url(server), max_size=None) as ws:
                await ws.send("reply:" + "x" * 900)
                assert len(await ws.recv()) == 900
                await ws.send(b"y" * 1001)
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await ws.recv()
                return closed.value.rcvd.code if closed.value.rcvd else None

        assert await in_client_thread(client) == 1009
        assert len(recorder.messages) == 1


async def test_an_acceptor_that_crashes_is_restarted_and_the_server_keeps_accepting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with start_link(server_options(number_of_workers=1)) as server:
        original = server._accept
        faults = [RuntimeError("injected accept fault")]

        async def faulty_accept(listener: Any, lock: Any) -> Any:
            if faults:
                raise faults.pop()
            return await original(listener, lock)

        monkeypatch.setattr(server, "_accept", faulty_accept)
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))  # the new acceptor meets the fault

        async def client() -> object:
            async with connect(url(server)) as ws:
                await ws.send("after the crash")
                return await ws.recv()

        assert await in_client_thread(client) == "after the crash"
        assert server.acceptor_supervisor.restart_count == 1


async def test_too_many_open_files_slows_accepting_without_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_link(server_options(number_of_workers=1)) as server:
        original = server._accept
        faults = [OSError(errno.EMFILE, "Too many open files")]

        async def exhausted_accept(listener: Any, lock: Any) -> Any:
            if faults:
                raise faults.pop()
            return await original(listener, lock)

        monkeypatch.setattr(server, "_accept", exhausted_accept)
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))

        async def client() -> object:
            async with connect(url(server)) as ws:
                await ws.send("served")
                return await ws.recv()

        assert await in_client_thread(client) == "served"
        assert server.acceptor_supervisor.restart_count == 0
    assert any("Too many open files" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


class LineEcho:
    """A protocol module written for the test: echoes lines with a prefix; ``quit`` ends."""

    name: ClassVar[str] = "lines"
    handshake: ClassVar[bool] = False

    @classmethod
    def parse_options(cls, raw: Any, path: str) -> Mapping[str, Any]:
        options = dict(raw)
        if not isinstance(options.get("prefix", ""), str):
            raise pywsserver.OptionError(f"{path}.prefix", "expected a str")
        return options

    def __init__(self, options: Mapping[str, Any], connection: ConnectionInfo) -> None:
        self.prefix = options.get("prefix", "").encode()
        self.buffer = b""

    def start(self, data: bytes, context: Mapping[str, Any]) -> list[Effect]:
        return self.data_received(data) if data else []

    def data_received(self, data: bytes) -> list[Effect]:
        self.buffer += data
        effects: list[Effect] = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line == b"quit":
                return [*effects, Write(b"bye\n"), CloseSocket(), Stop("quit")]
            effects.append(Write(self.prefix + line + b"\n"))
        return effects

    def eof_received(self) -> list[Effect]:
        return [Stop("eof")]

    def action(self, action: Action) -> list[Effect]:
        if isinstance(action, SendAction):
            data = action.data.encode() if isinstance(action.data, str) else action.data
            return [Write(data + b"\n")]
        return []

    def timer_expired(self, name: str) -> list[Effect]:
        return []

    def handler_returned(self, result: Any) -> list[Effect]:
        return []

    def handler_failed(self, error: BaseException) -> list[Effect]:
        return []


async def _talk(port: int, preamble: bytes, lines: list[bytes]) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(preamble + b"".join(lines))
        received = b""
        with anyio.fail_after(10):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


async def test_a_custom_protocol_module_replaces_the_http_module() -> None:
    options = [
        ("port", 0),
        ("worker_options", [("initial_module", "lines"), ("protocol_modules", [(LineEcho, [("prefix", "> ")])])]),
    ]
    async with start_link(options) as server:
        answer = await _talk(server.port, b"", [b"one\n", b"two\n", b"quit\n"])
        assert answer == b"> one\n> two\nbye\n"


async def test_the_http_module_can_switch_to_a_custom_module_after_the_handshake() -> None:
    options = [
        ("port", 0),
        (
            "worker_options",
            [("protocol_modules", [("http", [("upgrade_to", "lines")]), ("tests.test_server_protocols:LineEcho", [])])],
        ),
    ]
    async with start_link(options) as server:
        answer = await _talk(server.port, HANDSHAKE.format(version=13).encode(), [b"after upgrade\n", b"quit\n"])
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
        assert rest == b"after upgrade\nbye\n"


async def test_a_protocol_module_missing_a_callback_is_refused_at_start() -> None:
    class Incomplete:
        def start(self, data: bytes, context: Any) -> list[Effect]:
            return []

    options = [("worker_options", [("initial_module", "x"), ("protocol_modules", [("x", [])])])]
    with pytest.raises(pywsserver.OptionError, match=r"protocol_modules\.x: cannot import 'x'"):
        async with start_link(options):
            pass
    options = [("worker_options", [("protocol_modules", [(Incomplete, [])])])]
    with pytest.raises(pywsserver.OptionError, match="is not a protocol module: it has no method 'data_received'"):
        async with start_link(options):
            pass


async def test_messages_sent_right_after_the_handshake_are_not_lost() -> None:
    async with start_link(server_options()) as server, await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        client = RawClient(stream)
        from wsproto.events import Request

        await stream.send(client.ws.send(Request(host="localhost", target="/")))
        # The frame is written before the 101 arrives, in the same packet as far as the server can tell.
        # wsproto refuses to encode it before the handshake, so frame it by hand (masked, "hi").
        await stream.send(b"\x81\x82\x00\x00\x00\x00hi")
        events = []
        while len(events) < 2:
            event = await client.next_event()
            assert event is not None
            events.append(event)
        assert isinstance(events[1], TextMessage)
        assert events[1].data == "hi"


class FailsFirst(LineEcho):
    """`LineEcho`, whose first connection's module cannot be made."""

    made = 0

    def __init__(self, options: Mapping[str, Any], connection: ConnectionInfo) -> None:
        FailsFirst.made += 1
        if FailsFirst.made == 1:
            raise RuntimeError("the first module cannot be made")
        super().__init__(options, connection)


async def test_a_connection_whose_first_module_cannot_be_made_is_closed_and_gives_back_its_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker's start fails: the socket is closed (the client sees the end) and its slot of
    ``max_connections`` (one here) goes back, so the next connection is served."""
    FailsFirst.made = 0
    options = [
        ("port", 0),
        ("max_connections", 1),
        ("worker_options", [("initial_module", "lines"), ("protocol_modules", [(FailsFirst, [])])]),
    ]
    async with start_link(options) as server:
        assert await _talk(server.port, b"", [b"lost\n"]) == b""
        assert await _talk(server.port, b"", [b"served\n", b"quit\n"]) == b"served\nbye\n"
    assert "the first module cannot be made" in caplog.text


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_worker_failing_before_its_module_leaves_nothing_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while the worker is attached to its driver, before any module is made (here the
    addresses cannot be read), still unregisters the socket from the event loop before it is closed:
    no entry of a closed socket is left in the selector, where it would stand in the way of the next
    socket given its number."""
    import asyncio

    from pywsserver._asyncio_driver import ProtocolDriver
    from pywsserver._socket_transport import SocketTransport

    addresses = ProtocolDriver.addresses
    failures = [RuntimeError("no addresses")]

    def failing_once(self: ProtocolDriver) -> Any:
        if failures:
            raise failures.pop()
        return addresses(self)

    monkeypatch.setattr(ProtocolDriver, "addresses", failing_once)
    options = [
        ("port", 0),
        ("max_connections", 1),
        ("worker_options", [("initial_module", "lines"), ("protocol_modules", [(LineEcho, [])])]),
    ]
    async with start_link(options) as server:
        assert await _talk(server.port, b"", [b"lost\n"]) == b""
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        closed = [
            key
            for key in selector.get_map().values()
            if isinstance(getattr(getattr(key.data[0], "_callback", None), "__self__", None), SocketTransport)
            and key.data[0]._callback.__self__._sock.fileno() < 0
        ]
        assert closed == []
        assert await _talk(server.port, b"", [b"served\n", b"quit\n"]) == b"served\nbye\n"
