"""The anyio stream driver: a connection's bytes through an anyio byte stream (trio and any other backend).

Two tasks, both in the driver's task group (owned by the worker's task): the
*reader* receives bytes and hands them to the core, runs the core's timers
(as the deadline of the receive) and makes the async handler calls the core
asks for; the *mailbox* task hands the core the actions queued by
``send``/``ping``/``close`` callers. What the core writes (the driver is its writer) is
gathered and written by whichever task produced it, through one lock, so
writes keep their order. TLS is anyio's `TLSStream`, its handshake bounded by
``tls_handshake_timeout``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.tls import TLSAttribute, TLSStream

if TYPE_CHECKING:
    from ._core import ConnectionCore

__all__ = ["StreamDriver"]

_CLOSED_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class StreamDriver:
    """Drives a connection core from an anyio byte stream; owns the stream."""

    __slots__ = (
        "_close_requested",
        "_core",
        "_pending",
        "_scope",
        "_stream",
        "_tls",
        "_tls_handshake_timeout",
        "_write_lock",
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
        self._pending: list[bytes] = []  # what the core handed over, to be written
        self._close_requested = False
        self._scope: anyio.CancelScope | None = None
        self._write_lock = anyio.Lock(fast_acquire=True)
        core._writer = self
        core._clock = anyio.current_time

    def write(self, data: bytes) -> None:
        """The core's output: written by the task that produced it, at its next `_write_pending`."""
        self._pending.append(data)

    def addresses(self) -> tuple[Any, Any]:
        """The peer's and the local address."""
        stream = self._stream
        return (
            stream.extra(anyio.abc.SocketAttribute.remote_address, None),
            stream.extra(anyio.abc.SocketAttribute.local_address, None),
        )

    # ----------------------------------------------------------- the tasks

    async def serve(self) -> None:
        """The TLS handshake, then the reader and the mailbox task until the module stops."""
        core = self._core
        core._mailbox()  # the mailbox task reads it from the start
        if self._tls is not None and not await self._start_tls():
            return
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            tg.start_soon(self._mailbox_loop)
            core._feed(core._module.start(b"", {}))
            await self._settle()
            await self._reader_loop()
            tg.cancel_scope.cancel()

    async def drain(self) -> None:
        """Write what ``GoingAway`` produced, then read until the module stops."""
        await self._settle()
        await self._reader_loop()

    async def _reader_loop(self) -> None:
        core = self._core
        stream = self._stream
        while not core._stopped and not core._socket_closed:
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
            core._feed(core._module.data_received(data))
            await self._settle()

    async def _settle(self) -> None:
        """Write what the core produced; make the async handler calls it waits on, and write again."""
        core = self._core
        await self._write_pending()
        while core._busy and not core._stopped:
            await core._call_async_handler()
            if core._backlog and not core._busy:
                core._take_backlog()  # timers that expired together wait there while one is busy
            await self._write_pending()

    async def _mailbox_loop(self) -> None:
        core = self._core
        assert core._mailbox_receive is not None
        async for action in core._mailbox_receive:
            core._act(action)
            await self._write_pending()
            if core._stopped:
                return

    async def _write_pending(self) -> None:
        """Write what is pending, then close if the core asked to; under the lock, so in order."""
        pending = self._pending
        if not pending and not self._close_requested:
            return
        async with self._write_lock:
            while pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                try:
                    await self._stream.send(data)
                except _CLOSED_ERRORS:
                    self._core._socket_closed = True
                    pending.clear()
            if self._close_requested:
                self._close_requested = False
                await self._close()

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
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._stream.aclose()

    # ------------------------------------------------------- the core's asks

    def close_socket(self) -> None:
        """Close once what is pending is written (by the task that wrote it)."""
        self._close_requested = True

    def abort(self) -> None:
        """Stop the tasks now; the core's end closes the stream."""
        if self._scope is not None:
            self._scope.cancel()

    async def close_now(self) -> None:
        """Close the open stream (bounded: a peer that does not read cannot hold it)."""
        await self._close()

    def pause_reading(self) -> None:
        """Nothing to do: the reader does not read while the core is busy."""

    def resume_reading(self) -> None:
        """Nothing to do (see `pause_reading`)."""

    def wake(self) -> None:
        """Nothing to do: the tasks wait on the stream and the mailbox themselves."""

    def wake_at(self, deadline: float) -> None:
        """Nothing to do: the reader takes the earliest deadline at each receive."""

    def cancel_timer(self) -> None:
        """Nothing to do (see `wake_at`)."""

    def flush_soon(self) -> None:
        """Never asked: broadcasts are written now only when the core can write now, never here."""
