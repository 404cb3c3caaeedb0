"""Clients for the integration tests: the websockets library in a thread, and a raw wsproto client.

The server under test runs on the test's anyio backend (asyncio or trio);
the ``websockets`` client runs its own asyncio loop in a worker thread, so it
is a real, independent client on both backends. :class:`RawClient` speaks
through an anyio socket with wsproto's client, for what ``websockets`` will
not do (broken frames, unsolicited pongs, abrupt disconnects).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request

T = TypeVar("T")


async def in_client_thread(function: Callable[..., Awaitable[T]], *args: Any, timeout: float = 30) -> T:
    """Run an asyncio coroutine function in a fresh thread with its own event loop."""

    def target() -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(function(*args), timeout)

        return asyncio.run(bounded())

    return await anyio.to_thread.run_sync(target)


def url(server: Any, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


class RawClient:
    """A minimal WebSocket client over an anyio socket, driven by wsproto."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    @classmethod
    async def connect(cls, port: int, path: str = "/", host: str = "127.0.0.1") -> RawClient:
        client = cls(await anyio.connect_tcp(host, port))
        authority = f"[{host}]" if ":" in host else host
        await client.stream.send(client.ws.send(Request(host=f"{authority}:{port}", target=path)))
        event = await client.next_event()
        if not isinstance(event, AcceptConnection):
            raise ConnectionError(f"handshake refused: {event!r}")
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def next_event(self, timeout: float = 10) -> Event | None:
        """The next event from the server, or ``None`` when it closed the TCP connection."""
        with anyio.fail_after(timeout):
            while not self.pending:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return None
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def raw_http(port: int, request: bytes) -> bytes:
    """Send raw bytes and read everything the server answers until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        chunks = []
        with anyio.fail_after(10):
            while True:
                try:
                    chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return b"".join(chunks)


async def no_connections(server: Any, timeout: float = 5) -> bool:
    """Wait until the server's worker supervisor has no live worker (each exit is reported to it)."""
    with anyio.fail_after(timeout):
        while server.connections:
            await anyio.lowlevel.checkpoint()
    return True


async def response_head(port: int, request: bytes) -> bytes:
    """Send raw bytes and read the server's response head (an upgrade's 101 leaves the connection open)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        received = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in received:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return received.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


__all__ = [
    "RawClient",
    "no_connections",
    "RejectConnection",
    "RejectData",
    "in_client_thread",
    "raw_http",
    "response_head",
    "url",
]
