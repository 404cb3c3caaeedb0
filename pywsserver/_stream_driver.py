"""The anyio stream driver: a connection's bytes through an anyio byte stream (trio and any other backend).

Three tasks, all in the driver's task group (owned by the worker's task): the
*reader* receives bytes and hands them to the core, runs the core's timers
(as the deadline of the receive) and makes the async handler calls the core
asks for; the *mailbox* task, woken by the core, carries out the actions that
had to wait in the mailbox; the *writer* writes what the core produced, in
order. Like asyncio's transport, the writer holds what waits to be written:
above ``write_buffer_size`` bytes the core cannot write (``_can_write``), the
reader stops reading and ``send``/``ping``/``close`` callers' actions wait in
the mailbox (timers still run), until it is down to a quarter of that. Below
it an action is carried out at once, in its caller's task, as on the other
drivers. TLS is anyio's `TLSStream`, its handshake bounded by
``tls_handshake_timeout``.

Order: an action is taken from the mailbox and carried out in one go
(`ConnectionCore._take_mailbox`), never held by a task between the two, so
that whoever takes the next one (the mailbox task, or the core before an
async handler's reply) cannot overtake it: an async handler's own sends and
broadcasts go out in the order it made them, before its reply.

The socket's end: what the core produced is written, then the stream is
closed; a peer that does not read gets `pywsserver._core.CLOSE_LINGER`
seconds, then the stream is closed with what is left unsent.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

from . import _core

if TYPE_CHECKING:
    from ._core import ConnectionCore

__all__ = ["StreamDriver"]

_CLOSED_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class StreamDriver:
    """Drives a connection core from an anyio byte stream; owns the stream."""

    __slots__ = (
        "_close_requested",
        "_closed",
        "_core",
        "_finishing",
        "_output",
        "_pending",
        "_pending_bytes",
        "_room",
        "_scope",
        "_stream",
        "_tls",
        "_tls_handshake_timeout",
        "_wakeup",
        "_writer_done",
    )

    def __init__(
        self,
        core: ConnectionCore,
        stream: anyio.abc.ByteStream,
        tls: ssl.SSLContext | None,
        tls_handshake_timeout: float,
    ) -> None:
        self._core = core
        self._stream = stream
        self._tls = tls
        self._tls_handshake_timeout = tls_handshake_timeout
        self._pending: list[bytes] = []  # what the core produced, for the writer
        self._pending_bytes = 0
        self._output = anyio.Event()  # set when there is something for the writer to do
        self._room: anyio.Event | None = None  # set when the pending bytes are down again
        self._wakeup = anyio.Event()  # set by wake(): the mailbox task looks at the mailbox
        self._writer_done: anyio.Event | None = None
        self._close_requested = False
        self._finishing = False
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        core._writer = self
        core._clock = anyio.current_time

    def write(self, data: bytes) -> None:
        """The core's output, for the writer task; above ``write_buffer_size`` the core cannot write."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        core = self._core
        if core._can_write and self._pending_bytes > core._options.write_buffer_size:
            core._can_write = False  # actions wait in the mailbox, the reader stops reading
        if not self._output.is_set():
            self._output.set()

    def addresses(self) -> tuple[Any, Any]:
        """The peer's and the local address."""
        stream = self._stream
        return (
            stream.extra(anyio.abc.SocketAttribute.remote_address, None),
            stream.extra(anyio.abc.SocketAttribute.local_address, None),
        )

    # ----------------------------------------------------------- the tasks

    def serve(self) -> Awaitable[None]:
        """The TLS handshake, then the reader, mailbox and writer tasks until the module stops."""
        return self._serve()

    async def _serve(self) -> None:
        core = self._core
        if self._tls is not None and not await self._start_tls():
            return
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            self._writer_done = anyio.Event()
            tg.start_soon(self._writer_loop)
            tg.start_soon(self._mailbox_loop)
            core._can_write = True
            core._feed(core._module.start(b"", {}))
            await self._settle()
            await self._reader_loop()
            await self._finish_writing()
            tg.cancel_scope.cancel()

    async def drain(self) -> None:
        """Write what ``GoingAway`` produced, then read until the module stops."""
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            self._writer_done = anyio.Event()
            self._finishing = False
            tg.start_soon(self._writer_loop)
            tg.start_soon(self._mailbox_loop)
            await self._settle()
            await self._reader_loop()
            await self._finish_writing()
            tg.cancel_scope.cancel()

    async def _reader_loop(self) -> None:
        core = self._core
        stream = self._stream
        while not core._stopped and not core._socket_closed:
            if not core._can_write:
                await self._wait_for_room()
                continue
            timers = core._timers
            if timers:
                with anyio.CancelScope(deadline=min(timers.values())) as scope:
                    try:
                        data = await stream.receive()
                    except _CLOSED_ERRORS:
                        core._feed(core._module.eof_received())
                        await self._settle()
                        return
                if scope.cancelled_caught:
                    core._timers_due()
                    await self._settle()
                    continue
            else:
                try:
                    data = await stream.receive()
                except _CLOSED_ERRORS:
                    core._feed(core._module.eof_received())
                    await self._settle()
                    return
            if core._frames_log is not None:
                core._frames_log.debug("received %d bytes", len(data))
            core._bytes_in += len(data)
            core._feed(core._module.data_received(data))
            await self._settle()

    async def _wait_for_room(self) -> None:
        """Wait until the writer is down to a quarter of the bound; the reader runs the timers meanwhile."""
        core = self._core
        room = self._room
        if room is None or room.is_set():
            room = self._room = anyio.Event()
        deadline = min(core._timers.values()) if core._timers else math.inf
        with anyio.CancelScope(deadline=deadline) as scope:
            await room.wait()
        if scope.cancelled_caught:
            core._timers_due()
            await self._settle()

    async def _settle(self) -> None:
        """Make the async handler calls the core waits on (what they produce goes to the writer)."""
        core = self._core
        while core._busy and not core._stopped:
            await core._call_async_handler()
            if core._backlog and not core._busy:
                core._take_backlog()  # timers that expired together wait there while one is busy

    async def _mailbox_loop(self) -> None:
        """Carry out what waits in the mailbox, while the core can write, each time the core wakes it.

        It never waits in the mailbox's ``receive``: an action handed to a waiting receiver would
        be held by this task until it runs, and an action queued after it, or the async handler's
        reply, could go out first. The writer wakes it when the core can write again.
        """
        core = self._core
        while not core._stopped:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            core._take_mailbox()

    async def _writer_loop(self) -> None:
        """Write what is pending, in order; close when the core asked to; end when serving ends."""
        core = self._core
        pending = self._pending
        limit = core._options.write_buffer_size
        try:
            while True:
                if not pending:
                    if self._close_requested:
                        await self._close()
                        return
                    if self._finishing:
                        return
                    await self._output.wait()
                    self._output = anyio.Event()
                    continue
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                try:
                    await self._stream.send(data)
                except _CLOSED_ERRORS:
                    core._socket_closed = True
                    return
                finally:
                    self._pending_bytes -= len(data)
                if not core._can_write and self._pending_bytes <= limit // 4:
                    core._can_write = True
                    self.wake()  # the mailbox task carries out the actions that waited
                    if self._room is not None:
                        self._room.set()
        finally:
            if core._socket_closed and not self._closed:
                pending.clear()
                self._pending_bytes = 0
            if self._room is not None:
                self._room.set()
            if self._writer_done is not None:
                self._writer_done.set()

    async def _finish_writing(self) -> None:
        """Serving is over: give the writer `CLOSE_LINGER` seconds to write what is pending."""
        self._finishing = True
        self._output.set()
        assert self._writer_done is not None
        with anyio.move_on_after(_core.CLOSE_LINGER):
            await self._writer_done.wait()

    async def _start_tls(self) -> bool:
        """The TLS handshake, bounded by ``tls_handshake_timeout``; ``False`` if it failed."""
        assert self._tls is not None
        try:
            with anyio.fail_after(self._tls_handshake_timeout):
                self._stream = await TLSStream.wrap(
                    self._stream, server_side=True, ssl_context=self._tls, standard_compatible=False
                )
        except (OSError, ssl.SSLError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as error:
            await anyio.aclose_forcefully(self._stream)
            self._core._tls_failed(error)
            return False
        self._core._connection_secured(self._stream.extra(TLSAttribute.ssl_object))
        return True

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._stream.aclose()

    # ------------------------------------------------------- the core's asks

    def close_socket(self) -> None:
        """Close once what is pending is written (by the writer)."""
        self._close_requested = True
        if not self._output.is_set():
            self._output.set()

    def abort(self) -> None:
        """Stop the tasks now; the core's end closes the stream."""
        if self._scope is not None:
            self._scope.cancel()

    async def closed(self) -> None:
        """Close the stream, with what is left unsent (the writer had its linger)."""
        await self._close()

    def pause_reading(self) -> None:
        """Nothing to do: the reader does not read while the core is busy."""

    def resume_reading(self) -> None:
        """Nothing to do (see `pause_reading`)."""

    def wake(self) -> None:
        """Wake the mailbox task (actions wait in the mailbox); the reader waits on the stream itself."""
        if not self._wakeup.is_set():
            self._wakeup.set()

    def wake_at(self, deadline: float) -> None:
        """Nothing to do: the reader takes the earliest deadline at each receive."""

    def cancel_timer(self) -> None:
        """Nothing to do (see `wake_at`)."""

    def flush_soon(self) -> None:
        """A broadcast's frame, gathered while the core can write: handed to the writer now."""
        self._core._flush()
