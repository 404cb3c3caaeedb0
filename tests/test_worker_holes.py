"""The worker against clients that hold it: jammed sockets, closed TLS connections, unread sends."""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trustme
from wsproto.events import CloseConnection

from pywsserver import ConnectionClose, Worker, _core, broadcast_threadsafe, start_link
from pywsserver._worker import bad_input
from pywsserver.testing import Client

from .reliability_tools import UPGRADE, masked_frame, open_descriptors, wait_until
from .wstools import RawClient

pytestmark = pytest.mark.anyio


class Tracked:
    """Counts connections in ``options["seen"]`` (as weak references: the test must not keep workers alive)."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, Any] = options["seen"]
        seen["workers"].append(weakref.ref(options["worker"]))
        return seen

    def handle(self, message: Any, seen: dict[str, Any]) -> Any:
        if isinstance(message, ConnectionClose):
            seen["closes"].append(message)
            return ("noreply", seen)
        if message == "big":  # more than the kernel's buffers hold for a peer that does not read
            return ("reply", b"x" * (8 << 20), seen)
        return ("reply", message, seen)


def options(seen: dict[str, Any], *websocket: tuple[str, Any], **top: Any) -> list[tuple[str, Any]]:
    return [
        ("port", 0),
        *top.items(),
        (
            "worker_options",
            [
                (
                    "protocol_modules",
                    [("websocket", [("handler_module", Tracked), ("handler_options", {"seen": seen}), *websocket])],
                )
            ],
        ),
    ]


def new_seen() -> dict[str, Any]:
    return {"workers": [], "closes": []}


def jammed_client(port: int) -> socket.socket:
    """Upgrades, asks for 8 MiB and never reads: the server cannot write what it owes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(UPGRADE + masked_frame(0x1, b"big"))
    return sock


async def test_jammed_connections_are_closed_before_their_slots_are_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """More jammed connections than ``max_connections``: each is closed by the server (keepalive, then
    close timeout, then the linger), its socket closed before its slot serves the next one."""
    monkeypatch.setattr(_core, "CLOSE_LINGER", 0.3, raising=False)
    seen = new_seen()
    websocket = (("ping_interval", 0.2), ("ping_timeout", 0.2), ("close_timeout", 0.2))
    async with start_link(options(seen, *websocket, max_connections=2, number_of_workers=2)) as server:
        before = open_descriptors()
        clients = [jammed_client(server.port) for _ in range(5)]
        try:
            await wait_until(lambda: len(seen["closes"]) == 5 and server.connections == 0)
            assert [close.code for close in seen["closes"]] == [1011] * 5  # the keepalive's timeout
            if before >= 0:
                # Only the test's own five sockets: the server closed its end of every one.
                assert open_descriptors() <= before + 5
            async with await Client.connect(server.port) as client:  # the slots serve again
                await client.send("still serving")
                assert await client.receive() == "still serving"
        finally:
            for sock in clients:
                sock.close()


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    authority = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authority.configure_trust(client)
    return server, client


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "tcp"])
async def test_closed_connections_free_their_workers_without_a_garbage_collection(
    secure: bool, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], no_gc: None
) -> None:
    """No reference cycle keeps a closed connection's worker (and its TLS buffers) alive: with the
    garbage collector off, reference counting alone frees every one."""
    server_context, client_context = tls_contexts
    seen = new_seen()
    extra = {"tls": server_context} if secure else {}
    async with start_link(options(seen, **extra)) as server:
        for _ in range(10):
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                "127.0.0.1",
                server.port,
                ssl_context=client_context if secure else None,
                tls_hostname="localhost" if secure else None,
                tls_standard_compatible=False,
            )
            await stream.send(UPGRADE)
            head = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
            assert head.startswith(b"HTTP/1.1 101")
            await stream.aclose()
        await wait_until(lambda: len(seen["closes"]) == 10 and server.connections == 0)
        for _ in range(10):  # the end's last callbacks
            await anyio.lowlevel.checkpoint()
        alive = [ref() for ref in seen["workers"] if ref() is not None]
        assert alive == [], f"{len(alive)} of 10 closed connections' workers are still alive"
        assert all(isinstance(worker, Worker) for worker in alive)


async def test_a_clients_own_close_is_not_our_violation_and_its_reason_is_logged_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client closing cleanly with 1002 broke nothing; its reason (with a newline) forges no log line.
    A frame we close the connection for is reported once, as a protocol violation."""
    bad_input.reset()  # another test may have reported within the interval
    seen = new_seen()
    with caplog.at_level(logging.DEBUG, "pywsserver"):
        async with start_link(options(seen)) as server:
            client = await RawClient.connect(server.port)
            await client.send(CloseConnection(code=1002, reason="forged\nline"))
            assert isinstance(await client.next_event(), CloseConnection)  # our answer
            await client.aclose()
            offender = await RawClient.connect(server.port)
            await offender.send_raw(bytes((0x81, 0x01, ord("x"))))  # unmasked: 1002 from us
            event = await offender.next_event()
            assert isinstance(event, CloseConnection) and event.code == 1002
            await offender.aclose()
            await wait_until(lambda: len(seen["closes"]) == 2 and server.connections == 0)
    assert [close.code for close in seen["closes"]] == [1002, 1002]
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("pywsserver")]
    assert not [message for message in messages if "forged\n" in message], "a client's text made a log line"
    reports = [r.getMessage() for r in caplog.records if r.name == "pywsserver.bad_input"]
    assert len(reports) == 1 and reports[0].startswith("protocol violations: 127.0.0.1:"), reports


def held_bytes(worker: Worker) -> int:
    """What the server holds for one connection: the messages waiting in its mailbox and its driver's buffer."""
    mailbox = worker._mailbox_send
    queued = mailbox.statistics().current_buffer_used if mailbox is not None else 0
    driver: Any = worker._driver
    transport = getattr(driver, "_transport", None)
    buffered = transport.get_write_buffer_size() if transport is not None else getattr(driver, "_pending_bytes", 0)
    return int(queued * 65536 + buffered)


async def test_await_send_waits_on_the_bytes_queued_not_the_number_of_messages() -> None:
    """A task pushing 64 KiB messages to clients that never read: what each connection holds stays
    near ``write_buffer_size`` (mailbox plus buffer), not ``mailbox_size`` messages of any size."""
    seen = new_seen()
    async with start_link(options(seen)) as server:
        sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        for sock in sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(UPGRADE)  # and never reads
        try:
            await wait_until(lambda: len(seen["workers"]) == 2)
            workers = [ref() for ref in seen["workers"]]
            chunk = b"x" * 65536
            most = 0
            for worker in workers:
                assert worker is not None
                for _ in range(1000):
                    with anyio.move_on_after(0.5) as waited:
                        await worker.send(chunk)
                    if waited.cancelled_caught:
                        break  # await send waits: the connection holds all it may
                    most = max(most, held_bytes(worker))
                else:
                    pytest.fail("await send never waited")
                most = max(most, held_bytes(worker))
            # The mailbox's bound (64 KiB, the write_buffer_size) plus the driver's (64 KiB), each
            # passed by at most one message: 256 KiB, where 64 messages of 64 KiB would be 4 MiB.
            assert most <= 4 * 65536, most
        finally:
            for sock in sockets:
                sock.close()


class CallsThreadsafe:
    """A plain ``handle`` that calls the thread-safe forms from the event loop's own thread."""

    def init(self, options: dict[str, Any]) -> Any:
        worker = options["worker"]
        worker.join("threadsafe")
        return worker

    def handle(self, message: Any, worker: Any) -> Any:
        if isinstance(message, ConnectionClose):
            return ("noreply", worker)
        calls = {
            "send": lambda: worker.send_threadsafe("x"),
            "ping": lambda: worker.ping_threadsafe(b""),
            "close": lambda: worker.close_threadsafe(),
            "broadcast": lambda: broadcast_threadsafe("threadsafe", "x"),
        }
        try:
            calls[message]()
        except RuntimeError as error:
            return ("reply", str(error), worker)
        return ("reply", "no error", worker)


async def test_threadsafe_calls_from_the_event_loops_own_thread_raise_instead_of_hanging() -> None:
    """gen_server:call from the server process to itself fails at once with the exit reason calling_self
    (OTP 24 on) instead of waiting for a reply that cannot come: the *_threadsafe calls made from the
    event loop's own thread raise likewise, naming what to call instead, and never hang."""
    options = [
        ("port", 0),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", CallsThreadsafe)])])]),
    ]
    async with start_link(options) as server, await Client.connect(server.port) as client:
        for call, advice in [
            ("send", "send_nowait"),
            ("ping", "await worker.ping()"),
            ("close", "await worker.close()"),
            ("broadcast", "broadcast()"),
        ]:
            await client.send(call)
            with anyio.fail_after(10):
                answer = await client.receive()
            assert "event loop's own thread" in answer and advice in answer, answer
