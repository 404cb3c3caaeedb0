"""The worker against clients that hold it: jammed sockets, closed TLS connections, unread sends."""

from __future__ import annotations

import gc
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

from pywsserver import ConnectionClose, Worker, _core, start_link
from pywsserver.testing import Client

from .reliability_tools import UPGRADE, masked_frame, open_descriptors

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


async def wait_until(condition: Any, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.lowlevel.checkpoint()  # lets the server run; bounded by the timeout


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
