"""The trio driver (plain sockets on trio's low-level API) against the stream driver it replaced there.

Every test here runs on trio only: the driver exists nowhere else. The rest of the suite runs on
trio as well and goes through this driver for every plain connection.
"""

from __future__ import annotations

import functools
import socket
import ssl
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import trustme
from websockets.asyncio.client import connect

import pywsserver._server
from pywsserver import ConnectionClose, _core, broadcast, start_link
from pywsserver._stream_driver import StreamDriver
from pywsserver._trio_driver import TrioDriver
from pywsserver._trio_tls import TrioTLSDriver

from .reliability_tools import UPGRADE, masked_frame, wait_until
from .wstools import in_client_thread

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]


class Service:
    """Echo; ``stream:N:SIZE`` sends N binary messages of SIZE bytes (an async handler's ``await send``);
    ``all:TEXT`` broadcasts TEXT to everyone; ``big:SIZE`` replies SIZE bytes."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, Any] = options["seen"]
        worker = options["worker"]
        worker.join("everyone")
        seen["workers"].append(worker)
        seen["drivers"].append(type(worker._driver))
        return {"seen": seen, "worker": worker}

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        if isinstance(message, ConnectionClose):
            state["seen"]["closes"].append(message)
            return ("noreply", state)
        state["seen"]["messages"].append(message)
        if isinstance(message, str) and message.startswith("stream:"):
            _, count, size = message.split(":")
            for index in range(int(count)):
                await state["worker"].send(bytes([index % 256]) * int(size))
            return ("reply", "streamed", state)
        if isinstance(message, str) and message.startswith("all:"):
            broadcast("everyone", message[4:])
            return ("noreply", state)
        if isinstance(message, str) and message.startswith("big:"):
            return ("reply", b"y" * int(message[4:]), state)
        return ("reply", message, state)


def options(
    seen: dict[str, Any], *websocket: tuple[str, Any], handler: Any = None, **top: Any
) -> list[tuple[str, Any]]:
    return [
        ("port", 0),
        *top.items(),
        (
            "worker_options",
            [
                (
                    "protocol_modules",
                    [
                        (
                            "websocket",
                            [
                                ("handler_module", handler or Service),
                                ("handler_options", {"seen": seen}),
                                ("max_message_size", 16 << 20),
                                *websocket,
                            ],
                        )
                    ],
                )
            ],
        ),
    ]


def new_seen() -> dict[str, Any]:
    return {"workers": [], "drivers": [], "messages": [], "closes": []}


#: What the client sends, and then reads all that comes back: sizes across the frame-length bounds,
#: text and binary, a message the handler answers with many (``await send``), a broadcast, a large reply.
SCRIPT: list[str | bytes] = [
    "",
    "a",
    "é" * 62,
    b"\x00" * 125,
    b"\x01" * 126,
    "z" * 65535,
    b"\x02" * 65536,
    b"\x03" * (1 << 20),
    "stream:40:100000",
    "all:to everyone",
    "big:3000000",
    "last",
]


async def run_script(port: int, script: list[str | bytes], tls: ssl.SSLContext | None = None) -> list[Any]:
    """The client's part (websockets, in a thread): every message of ``script``, then what came back."""
    address = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/"
    async with connect(address, ssl=tls, max_size=None, compression=None) as ws:
        for message in script:
            await ws.send(message)
        answers: list[Any] = []
        while answers[-1:] != ["last"]:
            answers.append(await ws.recv())
        return answers


def expected_answers(script: list[str | bytes]) -> list[Any]:
    answers: list[Any] = []
    for message in script:
        if isinstance(message, str) and message.startswith("stream:"):
            _, count, size = message.split(":")
            answers += [bytes([index % 256]) * int(size) for index in range(int(count))] + ["streamed"]
        elif isinstance(message, str) and message.startswith("all:"):
            answers.append(message[4:])
        elif isinstance(message, str) and message.startswith("big:"):
            answers.append(b"y" * int(message[4:]))
        else:
            answers.append(message)
    return answers


async def test_plain_connections_take_the_trio_driver_and_tls_ones_its_tls_variant() -> None:
    authority = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    for tls, driver in [(None, TrioDriver), (context, TrioTLSDriver)]:
        seen = new_seen()
        async with start_link(options(seen, **({"tls": tls} if tls else {}))) as server:
            sock = socket.create_connection(("127.0.0.1", server.port))
            try:
                if tls is not None:
                    client = ssl.create_default_context()
                    authority.configure_trust(client)
                    wrap = functools.partial(client.wrap_socket, sock, server_hostname="127.0.0.1")
                    sock = await anyio.to_thread.run_sync(wrap)  # the handshake needs the server's loop
                sock.sendall(UPGRADE)
                await wait_until(lambda seen=seen: len(seen["workers"]) == 1)
                assert seen["drivers"] == [driver]
            finally:
                sock.close()


async def test_the_trio_driver_answers_as_the_stream_driver_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole client script over every driver on trio (the trio driver, its TLS variant, and the
    stream driver on a plain socket and over TLS): the same answers, in the same order, an async
    handler's own sends and broadcast included."""
    authority = trustme.CA()
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    authority.configure_trust(client_tls)
    results = []
    paths = [("plain", TrioDriver), ("tls", TrioTLSDriver), ("streams", StreamDriver), ("tls-streams", StreamDriver)]
    for path, driver in paths:
        if path == "streams":  # the acceptor hands anyio streams over, as it did before the trio driver
            monkeypatch.setattr(pywsserver._server, "_on_trio", lambda: False)
        seen = new_seen()
        tls = path.startswith("tls")
        async with start_link(options(seen, **({"tls": server_tls} if tls else {}))) as server:
            answers = await in_client_thread(run_script, server.port, SCRIPT, client_tls if tls else None, timeout=60)
        assert seen["drivers"] == [driver]
        results.append((answers, seen["messages"]))
    assert results[0] == (expected_answers(SCRIPT), SCRIPT)
    assert results[1] == results[0]
    assert results[2] == results[0]
    assert results[3] == results[0]


async def test_the_trio_driver_carries_an_async_handlers_sends_a_broadcast_and_large_replies_in_order() -> None:
    seen = new_seen()
    async with start_link(options(seen)) as server:
        answers = await in_client_thread(run_script, server.port, SCRIPT, timeout=60)
    assert seen["drivers"] == [TrioDriver]
    assert seen["messages"] == SCRIPT
    assert answers == expected_answers(SCRIPT)


async def test_the_connection_reads_on_while_the_kernel_holds_its_replies() -> None:
    """A client that does not read: the replies the kernel does not take wait in the driver (below
    ``write_buffer_size``), and the connection goes on reading and handling what the client sends."""
    seen = new_seen()
    async with start_link(options(seen)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        try:
            sock.sendall(UPGRADE)
            await wait_until(lambda: len(seen["workers"]) == 1)
            worker = seen["workers"][0]
            driver = worker._driver
            assert isinstance(driver, TrioDriver)
            # Replies of 16 KiB until the kernel's buffers are full and some wait in the driver.
            count = 0
            while not driver._pending:
                sock.sendall(masked_frame(0x1, b"big:16384"))
                count += 1
                await wait_until(lambda count=count: len(seen["messages"]) == count)
                assert count < 1000, "the kernel took 16 MiB for a peer that does not read"
            # The connection still reads: these are handled while the reply before waits.
            for index in range(3):
                sock.sendall(masked_frame(0x1, f"small {index}".encode()))
            await wait_until(lambda: seen["messages"][-1:] == ["small 2"])
            assert driver._pending_bytes <= worker._options.write_buffer_size
            # Once the client reads, everything arrives in order.
            sock.setblocking(False)
            expected = count * (4 + 16384) + sum(2 + len(f"small {index}") for index in range(3))
            received = bytearray()
            with anyio.fail_after(20):
                while len(received) < expected:
                    await anyio.wait_readable(sock)
                    received += sock.recv(1 << 20)
            assert received.endswith(b"\x81\x07small 0\x81\x07small 1\x81\x07small 2")
        finally:
            sock.close()


async def test_above_the_bound_the_connection_stops_reading_and_its_timers_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``write_buffer_size`` waiting for the kernel, nothing more is read; the keepalive's timers
    still run, drop the jammed peer (1011) and the socket is closed after the linger."""
    monkeypatch.setattr(_core, "CLOSE_LINGER", 0.3, raising=False)
    seen = new_seen()
    websocket = (("ping_interval", 0.3), ("ping_timeout", 0.3), ("close_timeout", 0.3))
    async with start_link(options(seen, *websocket)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        try:
            sock.sendall(UPGRADE + masked_frame(0x1, b"big:8000000"))
            await wait_until(lambda: len(seen["workers"]) == 1 and len(seen["messages"]) == 1)
            worker = seen["workers"][0]
            driver = worker._driver
            assert isinstance(driver, TrioDriver)
            await wait_until(lambda: not worker._can_write)
            assert driver._pending_bytes > worker._options.write_buffer_size
            sock.sendall(masked_frame(0x1, b"unread"))
            for _ in range(100):  # the server's task runs many times meanwhile; the message stays unread
                await anyio.lowlevel.checkpoint()
            assert seen["messages"] == ["big:8000000"]
            await wait_until(lambda: len(seen["closes"]) == 1 and server.connections == 0)
            assert seen["closes"][0].code == 1011  # the keepalive's timeout
            assert driver._closed
        finally:
            sock.close()


class SyncEcho:
    """A sync handler (the steady state's): echo, with every message recorded."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, Any] = options["seen"]
        seen["workers"].append(options["worker"])
        return seen

    def handle(self, message: Any, seen: dict[str, Any]) -> Any:
        if isinstance(message, ConnectionClose):
            seen["closes"].append(message)
            return ("noreply", seen)
        seen["messages"].append(message)
        return ("reply", message, seen)


async def test_a_sync_handlers_reads_are_parsed_in_the_shared_buffer_and_answered_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a sync handler the driver hands each read to the core's steady path, in place: the same
    answers as the general path for every size, up to a 1 MiB message that arrives in many reads."""
    steady_reads = []
    general_reads = []
    steady_read = _core.ConnectionCore._steady_read
    feed = _core.ConnectionCore._input

    def counting_steady_read(core: _core.ConnectionCore, buffer: memoryview, nbytes: int) -> None:
        steady_reads.append(nbytes)
        steady_read(core, buffer, nbytes)

    def counting_input(core: _core.ConnectionCore, kind: str, value: Any) -> None:
        if kind == "data":
            assert type(value) is bytes  # a copy: the shared buffer is read into again
            general_reads.append(len(value))
        feed(core, kind, value)

    monkeypatch.setattr(_core.ConnectionCore, "_steady_read", counting_steady_read)
    monkeypatch.setattr(_core.ConnectionCore, "_input", counting_input)
    script = [
        message for message in SCRIPT if not (isinstance(message, str) and message[:4] in ("stre", "all:", "big:"))
    ]
    seen = new_seen()
    async with start_link(options(seen, handler=SyncEcho)) as server:
        answers = await in_client_thread(run_script, server.port, script, timeout=60)
    assert seen["messages"] == script
    assert answers == script
    assert steady_reads, "no read took the steady path"
    assert general_reads, "the 1 MiB message's parts take the general path"
