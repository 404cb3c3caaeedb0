"""The worker: the public handle on one connection, over its core and its driver.

A worker is a temporary child of the worker supervisor, one per connection.
What it is made of:

* the connection core (``_core``): the handler contract, the effects of the
  protocol module, timers, the mailbox, the connection's life as one state
  table; no I/O;
* one driver, chosen by what the acceptor handed over: an accepted socket on
  asyncio goes to the asyncio driver (``_asyncio_driver``: protocol callbacks,
  the fast default), one on trio to the trio driver (``_trio_driver``: trio's
  low-level socket waits), an anyio byte stream (TLS on trio, any other
  backend) to the stream driver (``_stream_driver``).

`Worker` itself adds only what users call: ``send``/``ping``/``close``, their
``_nowait`` and ``_threadsafe`` forms, ``join``/``leave``, the connection's
info and state.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ._asyncio_driver import ProtocolDriver
from ._core import ConnectionCore, ConnectionLogger, WorkerState, bad_input, describe_output
from ._errors import ConnectionClosed
from ._messages import valid_close_code
from ._options import WorkerOptions
from ._stream_driver import StreamDriver
from .cluster._address import Address, address_of
from .protocols import CloseAction, PingAction, SendAction
from .supervision import MailboxFull, groups

__all__ = ["ConnectionLogger", "Worker", "WorkerState", "bad_input", "close", "describe_output", "ping", "send"]


class Worker(ConnectionCore):
    """The handle on one connection's worker.

    ``init`` receives it as ``options["worker"]``; keep it to talk to the
    connection later, from any task (``await worker.send(data)``) or from
    another thread (``worker.send_threadsafe(data)``). Once the connection
    is gone these raise `ConnectionClosed`.
    """

    __slots__ = ()

    def __init__(
        self,
        options: WorkerOptions,
        connection: anyio.abc.ByteStream | socket.socket,
        release: Callable[[], None] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = 10.0,
        token: anyio.lowlevel.EventLoopToken | None = None,
        addresses: tuple[Any, Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        ConnectionCore.__init__(self, options, release, token)  # not super(): no proxy object per connection
        if isinstance(connection, socket.socket):
            if _on_trio():  # trio is optional: its drivers are imported only where it runs
                if tls is None:
                    from ._trio_driver import TrioDriver

                    self._attach(TrioDriver(self, connection))
                else:
                    from ._trio_tls import TrioTLSDriver

                    self._attach(TrioTLSDriver(self, connection, tls, tls_handshake_timeout))
            else:
                self._attach(ProtocolDriver(self, connection, tls, tls_handshake_timeout, loop), addresses)
        else:
            self._attach(StreamDriver(self, connection, tls, tls_handshake_timeout))

    # ------------------------------------------------------------ public API

    @property
    def peer(self) -> tuple[str, int] | None:
        """The peer's ``(host, port)``."""
        return self.connection.peer

    async def send(self, data: str | bytes) -> None:
        """Queue a message (``str`` as text, ``bytes`` as binary); waits while the mailbox is full.

        Example: ``await worker.send("tick")`` from any task, with the worker ``init`` received.

        Raises `ConnectionClosed` when the connection is gone. A message
        queued while the connection is closing is dropped.
        """
        if not isinstance(data, str | bytes | bytearray | memoryview):
            raise TypeError(f"send() takes str or bytes, got {type(data).__name__}")
        await self._put(SendAction(data if isinstance(data, str | bytes) else bytes(data)))

    def send_nowait(self, data: str | bytes) -> None:
        """Like `send` but never waits: raises `MailboxFull` when the mailbox is full (in messages or bytes)."""
        if not isinstance(data, str | bytes):
            raise TypeError(f"send_nowait() takes str or bytes, got {type(data).__name__}")
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        if self._queued_bytes >= self._options.write_buffer_size and not self._writable_now():
            raise MailboxFull(f"the mailbox of {self!r} holds {self._queued_bytes} bytes")
        if not self._offer(SendAction(data)):
            raise MailboxFull(f"the mailbox of {self!r} is full")

    async def ping(self, data: bytes = b"") -> None:
        """Queue a ping carrying ``data`` (at most 125 bytes)."""
        if len(data) > 125:
            raise ValueError("a ping carries at most 125 bytes")
        await self._put(PingAction(bytes(data)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and ``reason``."""
        if not valid_close_code(code):
            raise ValueError(f"invalid close code {code!r}")
        await self._put(CloseAction(code, reason))

    @property
    def address(self) -> Address:
        """This connection's cluster-wide address: hand it to others to reach it (`pywsserver.cluster.send`)."""
        return address_of(self)

    def join(self, group: str) -> None:
        """Join a process group (see `pywsserver.groups`); left automatically when the connection ends."""
        groups.join(group, self)

    def leave(self, group: str) -> None:
        """Leave a process group."""
        groups.leave(group, self)

    def send_threadsafe(self, data: str | bytes) -> None:
        """`send` from another thread (blocks that thread until queued)."""
        self._from_thread(self.send, data)

    def ping_threadsafe(self, data: bytes = b"") -> None:
        """`ping` from another thread."""
        self._from_thread(self.ping, data)

    def close_threadsafe(self, code: int = 1000, reason: str = "") -> None:
        """`close` from another thread."""
        self._from_thread(self.close, code, reason)

    def _from_thread(self, function: Callable[..., Any], *args: Any) -> None:
        if self._token is None:
            raise ConnectionClosed(f"{self!r} is not running")
        check_not_in_loop_thread(
            self._token,
            f"worker.{function.__name__}_threadsafe()",
            f"worker.{function.__name__}_nowait() from a plain function, await worker.{function.__name__}() "
            "from async code"
            if function.__name__ == "send"
            else f"await worker.{function.__name__}() from async code",
        )
        try:
            anyio.from_thread.run(function, *args, token=self._token)
        except RuntimeError as error:  # the event loop has gone
            raise ConnectionClosed(f"{self!r} is closed: {error}") from None


def _on_trio() -> bool:
    """Whether this thread runs trio (trio is optional: not imported, it does not)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    in_trio_run = getattr(trio.lowlevel, "in_trio_run", None)  # trio 0.26 and later
    if in_trio_run is not None:
        return bool(in_trio_run())
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def check_not_in_loop_thread(token: anyio.lowlevel.EventLoopToken, what: str, instead: str) -> None:
    """Raise `RuntimeError` if this thread runs ``token``'s event loop: waiting for it there would
    wait forever (the loop cannot run the call while its own thread is blocked)."""
    native = token.native_token
    try:
        if asyncio.get_running_loop() is native:
            raise RuntimeError(
                f"{what} was called from the event loop's own thread, where it would wait forever; use {instead}"
            )
    except RuntimeError as error:
        if "event loop's own thread" in str(error):
            raise
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            current = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return
        if current is native:
            raise RuntimeError(
                f"{what} was called from the event loop's own thread, where it would wait forever; use {instead}"
            )


async def send(worker: Worker, data: str | bytes) -> None:
    """Send ``data`` on ``worker``'s connection (see `Worker.send`)."""
    await worker.send(data)


async def ping(worker: Worker, data: bytes = b"") -> None:
    """Ping ``worker``'s peer (see `Worker.ping`)."""
    await worker.ping(data)


async def close(worker: Worker, code: int = 1000, reason: str = "") -> None:
    """Close ``worker``'s connection (see `Worker.close`)."""
    await worker.close(code, reason)
