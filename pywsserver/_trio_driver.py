"""The trio driver: a connection's bytes through a non-blocking socket and trio's low-level API.

Plain TCP and Unix sockets on trio take this path; TLS connections take its
subclass `pywsserver._trio_tls.TrioTLSDriver`, which puts an ``ssl.SSLObject``
between the socket and the core.

One task per connection, the worker's own, and nothing else while the
connection is idle: no task group, no mailbox task, no stream objects. The
task waits with ``trio.lowlevel.wait_readable`` on the socket, reads with
``recv_into`` into one buffer shared by every connection of the thread, and
hands the read to the core, which runs a sync handler and writes its replies
before the task waits again: in the steady state the core parses the read
where it lies (`ConnectionCore._steady_read`), else it takes a copy. Writes are tried at once with ``sock.send``
(the core's writer is this driver): a broadcast costs one system call per
member and no task switch. Only what the kernel does not take waits in the
driver; a writer task then waits with ``wait_writable`` and sends it, in a
task group opened for as long as that lasts, while the connection's task
goes on reading.

Wake-ups: the task waits inside a cancel scope whose deadline is the core's
earliest timer; ``wake`` (an async handler call, actions in the mailbox, the
end) cancels it, the task looks at the core and waits in a new scope. A scope
is made per wake-up, not per message; a timer moved later costs nothing
(`ConnectionCore._set_timer` asks the driver only for an earlier one).

Bounds, as on the other paths: above ``write_buffer_size`` bytes waiting for
the kernel the task stops reading and actions wait in the mailbox, until it
is down to a quarter of that; the socket's end gives a graceful close
`pywsserver._core.CLOSE_LINGER` seconds to send what is left, then closes it.

Accepting: `serve_listener` is the server's acceptor on trio once it has
taken a connection: it keeps the listening socket and takes each next
connection itself, as the asyncio acceptor's armed listening socket does.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import trio

from . import _core

if TYPE_CHECKING:
    from ._core import ConnectionCore
    from ._server import Server

__all__ = ["TrioDriver", "serve_listener"]

_buffers = threading.local()
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


def _read_buffer() -> memoryview:
    """One read buffer for every connection of the calling thread's trio run.

    The task reads into it and copies the bytes out before it waits again, so
    the connections of one thread can share it: no allocation per read and no
    buffer per idle connection.
    """
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(262144))
    return view


class TrioDriver:
    """Drives a connection core from a non-blocking socket on trio; owns the socket."""

    __slots__ = (
        "_close_requested",
        "_closed",
        "_core",
        "_fd",
        "_handling",
        "_lost",
        "_nursery",
        "_pending",
        "_pending_bytes",
        "_reading",
        "_scope",
        "_sock",
        "_woken",
        "_writing",
    )

    def __init__(self, core: ConnectionCore, sock: socket.socket) -> None:
        self._core = core
        self._sock = sock
        self._fd = sock.fileno()
        self._pending: list[bytes | memoryview] = []  # what the kernel did not take yet, in order
        self._pending_bytes = 0
        self._scope: trio.CancelScope | None = None  # the task's current wait, cancelled by wake()
        self._nursery: trio.Nursery | None = None  # open while a writer task may be needed
        self._writing = False  # a writer task is running
        self._reading = True
        self._close_requested = False
        self._closed = False  # the socket is closed
        self._lost = False  # a write failed: the task tells the core
        self._handling = False  # the task is handing a read to the core
        self._woken = False  # wake() was called meanwhile
        core._writer = self
        core._clock = trio.current_time

    def addresses(self) -> tuple[Any, Any]:
        """The peer's and the local address."""
        return _sockname(self._sock.getpeername), _sockname(self._sock.getsockname)

    # ------------------------------------------------------------- writing

    def write(self, data: bytes) -> None:
        """The core's output: sent now if the kernel takes it, else kept for the writer task."""
        if self._closed or self._lost:
            return
        pending = self._pending
        if not pending:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._failed()
                return
            if sent == len(data):
                return
            self._keep(data, sent)
        else:
            self._keep(data, 0)

    def _keep(self, data: bytes, sent: int) -> None:
        """Keep what the kernel did not take of ``data`` for the writer task (started if need be)."""
        self._pending.append(memoryview(data)[sent:] if sent else data)
        self._pending_bytes += len(data) - sent
        core = self._core
        if core._can_write and self._pending_bytes > core._options.write_buffer_size:
            core._can_write = False
            core._pause_reading()
        if not self._writing:
            nursery = self._nursery
            if nursery is not None:
                self._writing = True
                nursery.start_soon(self._write_pending)
            else:
                self.wake()  # the task opens a task group for the writer

    def _send_pending(self) -> None:
        """Send what the kernel takes of the pending bytes now."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._failed()
            return
        pending.clear()
        if sent < len(data):
            pending.append(memoryview(data)[sent:])
        self._pending_bytes -= sent
        core = self._core
        if not core._can_write and self._pending_bytes <= core._options.write_buffer_size // 4:
            core._can_write = True
            # The actions that waited go out now, from this task: the connection's task may be the
            # async handler's, waiting for room in the mailbox (its own sends), and would wait forever.
            core._take_mailbox()
            core._resume_reading()
            self.wake()
        if not pending:
            if self._close_requested:
                self._close_now()
            self.wake()  # the task closes the writer's task group

    async def _write_pending(self) -> None:
        """The writer task: wait until the kernel takes more, send, until nothing is pending."""
        self._writing = True
        try:
            while self._pending and not self._closed and not self._lost:
                await _wait_writable(self._fd)
                self._send_pending()
        except trio.ClosedResourceError:  # aborted meanwhile
            pass
        finally:
            self._writing = False

    def _failed(self) -> None:
        """The socket failed (reset, broken pipe): nothing more is sent; the task tells the core."""
        self._lost = True
        self._pending.clear()
        self._pending_bytes = 0
        self.wake()

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._handling or self._writing:
                trio.lowlevel.notify_closing(self._fd)  # a task waiting on it gets ClosedResourceError
            # Else no task waits on the socket (its own task is handing a read over, no writer task
            # runs): closing it is enough, and the kernel drops it from epoll; trio's notice would
            # cost an EPOLL_CTL_DEL per connection (a close frame read closes the socket this way).
            self._sock.close()

    # ----------------------------------------------------------- the task

    def serve(self) -> Awaitable[None]:
        """Start the module now; the worker's task awaits the connection's loop directly."""
        core = self._core
        core._can_write = True
        core._feed(core._module.start(b"", {}))
        # A new connection's request has usually arrived with it: read it now, before the first wait
        # and outside its cancel scope. The wait skipped is a registration with epoll (two system
        # calls for a new socket) and a turn of trio's scheduler (1,098,000 to 1,043,000 instructions
        # per handshake under callgrind); the scope made after the handshake has the deadline the
        # handshake left, instead of having it moved earlier (837,400 to 833,600; echo unchanged).
        if not core._stopped:
            self._read_first()
        return self._run()

    def _read_first(self) -> None:
        """The read `serve` makes before the first wait (the TLS variant skips it while it holds bytes)."""
        self._read(_read_buffer())

    async def drain(self) -> None:
        """Serve on until the module stops after ``GoingAway``."""
        await self._run()

    async def _run(self) -> None:
        """The task's loop (as the asyncio driver's): async handler calls, queued input, the mailbox, reading."""
        core = self._core
        while True:
            if self._lost and not core._socket_closed:
                core._on_lost()
            if core._stopped or (core._socket_closed and not core._busy and not core._backlog):
                return
            if core._mailbox_receive is not None:
                core._take_mailbox()
            if core._busy:
                # In a task group of its own: the handler's sends may fill the kernel's buffer, and
                # their bytes must go on out (by a writer task) while the handler awaits.
                await self._with_writer(core._call_async_handler)
            if core._backlog and not core._busy:
                core._take_backlog()
                continue
            if not core._busy:
                if core._stopped or core._socket_closed or self._lost:
                    continue
                if self._pending:
                    await self._with_writer(self._wait)
                else:
                    await self._wait()

    async def _with_writer(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` with a task group where the writer task runs while bytes are pending."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if self._pending and not self._writing:
                    self._writing = True
                    nursery.start_soon(self._write_pending)
                await work()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()  # pending bytes left go on in the next wait

    async def _wait(self) -> None:
        """Read and hand the bytes to the core until woken, a timer is due or there is more to do."""
        core = self._core
        fd = self._fd
        view = _read_buffer()
        with trio.CancelScope(deadline=core._wake_at) as scope:
            self._scope = scope
            try:
                while True:
                    if not self._reading:
                        await trio.sleep_forever()  # until resume_reading wakes the task
                    await _wait_readable(fd)
                    if self._read(view):
                        return
            except trio.ClosedResourceError:  # aborted: the socket was closed under the wait
                return
            finally:
                self._scope = None
        if scope.cancelled_caught and core._wake_at <= trio.current_time():  # woken, or a timer is due
            core._timers_due()

    def _read(self, view: memoryview) -> bool:
        """Read once and hand the bytes to the core; ``True`` when the task has more to do than read."""
        try:
            size = self._sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._failed()
            return True
        if not size:
            return self._end_of_input()
        return self._hand(view, size)

    def _end_of_input(self) -> bool:
        """The peer's end: tell the core, then close once what is pending is sent, as asyncio's
        transport does after ``eof_received``. ``True``: the task has more to do than read."""
        core = self._core
        core._on_eof()
        if not core._socket_closed:
            core._socket_closed = True
            self.close_socket()
        return True

    def _hand(self, view: memoryview, size: int) -> bool:
        """Hand the ``size`` bytes read into ``view`` to the core; ``True`` when the task has more to
        do than read."""
        core = self._core
        # In the steady state the read is parsed where it lies, in the shared buffer, and its replies
        # written at once: no copy of the read and no effect objects (a 64 KiB message's read is not
        # copied again before it is unmasked); else a copy goes in. While the task hands a read over,
        # a wake-up is a flag, not a cancellation of its own wait, which trio makes costly: 1,043,000
        # to 1,020,000 instructions per handshake (the close frame's Stop woke the task reading it).
        self._handling = True
        try:
            if core._steady_ok or core._steady_check():
                core._steady_read(view, size)
            else:
                core._input("data", bytes(view[:size]))
        finally:
            self._handling = False
        if self._woken:
            self._woken = False
            return True
        return core._busy or core._stopped or core._socket_closed or self._lost

    def wake(self) -> None:
        """End the task's current wait (the task then looks at the core)."""
        if self._handling:  # the task itself is handing over a read: it looks once that is done
            self._woken = True
            return
        scope = self._scope
        if scope is not None:
            scope.cancel()

    # ------------------------------------------------------- the core's asks

    def close_socket(self) -> None:
        """Close once what is pending is sent (by the writer task, or by `closed` at the end)."""
        self._close_requested = True
        if not self._pending:
            self._close_now()

    def abort(self) -> None:
        """Drop the connection now, with what is pending."""
        self._core._socket_closed = True
        self._pending.clear()
        self._pending_bytes = 0
        self._close_now()

    def closed_now(self) -> bool:
        """`closed` when it needs no wait (nothing pending to linger over): ``True`` if it was done.

        The usual end (the socket closed after the close frame, or nothing left to send) spares
        the core its shielded cancel scope for the end (2 trio scopes made, one entered).
        """
        if self._closed:
            return True
        if self._pending and not self._lost:
            return False
        self._pending.clear()
        self._pending_bytes = 0
        self._close_now()
        return True

    async def closed(self) -> None:
        """Close the socket; what is pending gets `CLOSE_LINGER` seconds to be sent first."""
        if self.closed_now():
            return
        with trio.move_on_after(_core.CLOSE_LINGER):
            try:
                while self._pending and not self._closed and not self._lost:
                    await _wait_writable(self._fd)
                    self._send_pending()
            except trio.ClosedResourceError:
                pass
        self._pending.clear()
        self._pending_bytes = 0
        self._close_now()

    def pause_reading(self) -> None:
        """Stop reading (the task waits for a wake-up instead)."""
        self._reading = False

    def resume_reading(self) -> None:
        """Read again."""
        self._reading = True
        self.wake()

    def wake_at(self, deadline: float) -> None:
        """Bring the current wait's deadline forward; the next wait takes the core's earliest timer."""
        scope = self._scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def cancel_timer(self) -> None:
        """Nothing to do: the deadline ends with the task's wait."""

    def flush_soon(self) -> None:
        """Write the core's output now: one ``send`` per broadcast frame and member, no task switch.

        Called per member and broadcast frame: `ConnectionCore._flush` and `write` are written out
        here for the common case (one frame, nothing pending, no frame log), no call of either per
        member: 7,057 to 6,434 instructions per delivery under callgrind. The C speedup's
        ``deliver_frames`` does the same for a broadcast's members without calling this (its
        ``trio_send``, held equal to this method by ``tests/test_broadcast_speedups.py``): 4,761
        to 1,147.
        """
        core = self._core
        out = core._out
        if self._pending or len(out) != 1 or self._lost or core._socket_closed or core._frames_log is not None:
            core._flush()
            return
        data = out.pop()
        core._bytes_out += len(data)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._failed()
            return
        if sent != len(data):
            self._keep(data, sent)


async def serve_listener(raw: socket.socket, server: Server, batch: int) -> None:
    """An acceptor's loop on trio once it has taken a connection: take each connection waiting on
    ``raw``, with a slot of ``max_connections``, and start its worker, then wait on ``raw`` again;
    return when the slots run out, raise when an accept or a start fails (no slot held for it).

    One acceptor at a time (the caller holds the listening socket's lock, and keeps it while
    connections come): the others wait on the lock, instead of taking turns on it at every
    connection (a release that wakes the next acceptor, whose task then waits on the socket, and
    the last one queueing again), and a connection is taken without ``socket.accept``'s wrapper,
    which converts the family and type to enums (once per call here).
    """
    slots = server._slots
    start = server.worker_supervisor.start_child_soon
    family, kind, proto = raw.family, raw.type, raw.proto
    tcp = family != getattr(socket, "AF_UNIX", None)  # Unix sockets have no TCP_NODELAY
    while True:
        for _ in range(batch):  # a burst a batch at a time, then the workers started run
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:  # max_connections reached: the acceptor waits for a slot
                return
            try:
                fd, _ = raw._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                slots.release()
                break
            except BaseException:
                slots.release()
                raise
            client: socket.socket | None = None
            try:
                client = socket.socket(family, kind, proto, fileno=fd)
                client.setblocking(False)
                if tcp:
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                start(client)
            except BaseException:
                if client is not None:
                    client.close()  # closed before its slot is released
                slots.release()
                raise
        else:
            await trio.lowlevel.checkpoint()
            continue
        await _wait_readable(raw)


def _sockname(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except OSError:
        return None
