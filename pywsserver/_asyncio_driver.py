"""The asyncio driver: a connection's bytes through asyncio's protocol callbacks (the fast default path).

The driver is the connection's `asyncio.BufferedProtocol`. asyncio calls it
when bytes arrive (into one read buffer shared by every connection of the
event loop), at EOF, at loss and when the transport's write buffer crosses its
bounds; the driver hands each to the core at once, in the callback, so a sync
handler runs with no task switch. Writes go straight to ``transport.write``
(the core's writer is the transport). The connection's task (`ProtocolDriver.serve`) sleeps
on a future and wakes only for what needs a task: an async handler call, input
queued while one runs, actions waiting in the mailbox.

Write flow control: above ``write_buffer_size`` bytes buffered, asyncio calls
``pause_writing``; the driver stops reading (a peer that does not read gets no
more replies to produce) and actions wait in the mailbox until
``resume_writing``.

The transport, on asyncio's selector loop, is the driver's own (`SocketTransport`,
``_socket_transport``, which relies on the loop's selector and the data it keeps
there); elsewhere the loop's own, made with asyncio's private
``loop._make_socket_transport`` where the loop has it. These and
``_socket_transport`` are the only modules that touch asyncio's internals; the
test suite fails loudly if they disappear.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from . import _core
from ._deadlines import DeadlineQueue
from ._socket_transport import SocketTransport, sockname
from ._tls_pump import TLSPump
from .protocols._frames import steady_step

if TYPE_CHECKING:
    from ._core import ConnectionCore

__all__ = ["ProtocolDriver", "deadline_queue", "make_socket_transport"]


def make_socket_transport(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.BaseProtocol
) -> asyncio.Transport | None:
    """The transport asyncio's own servers make for an accepted socket, made now; ``None`` where there is none.

    ``loop.connect_accepted_socket`` (the public path) makes the same
    transport and then waits a loop turn for ``connection_made``: a task switch
    and a coroutine per connection that serve nothing here. Measured gain: a
    transport in 60 µs instead of 110 µs (16,700 against 9,100 a second, one
    event loop wrapping socket pairs, median of 5 rounds of 3,000), about 50
    µs of the 360 µs a handshake costs at 2,800 handshakes a second. Used
    where the driver's own transport (`SocketTransport`) is not, and for the
    TLS pump's transport. Only asyncio's selector loops have the method;
    elsewhere, and if a Python release drops it, the caller falls back to the
    public path (and ``tests/test_connection_core.py`` fails, so that the loss
    is seen).
    """
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return None
    make = getattr(loop, "_make_socket_transport", None)
    if make is None:
        return None
    transport: asyncio.Transport = make(sock, protocol)
    return transport


class _Wakeup:
    """What the connection's task sleeps on: a flag and, while someone waits, one future (no deque)."""

    __slots__ = ("_flag", "_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._future: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():
                future.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def future(self) -> asyncio.Future[None]:
        """A future to await until `set` is called (done already if it was): no coroutine frame while asleep."""
        future: asyncio.Future[None] = self._loop.create_future()
        if self._flag:
            future.set_result(None)
        else:
            self._future = future
        return future


_buffers = threading.local()


class _LoopShared:
    """What every connection of one event loop shares: its clock, the cores to flush at the turn's
    end, and its deadline queue while a server runs on it.

    Broadcast frames are not written member by member as they are queued: a
    core with a frame to write puts itself on ``flushes`` (`ConnectionCore._broadcast_now`)
    and the first one of a turn schedules `flush`, one loop callback for all of
    them, so that the frames of a burst go out with one system call per member.
    """

    __slots__ = ("clock", "deadline_users", "deadlines", "flushes", "loop", "selector")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clock: Callable[[], float] = loop.time  # one bound method per event loop, not one per connection
        self.flushes: list[ConnectionCore] = []
        #: The connections' timers while `deadline_queue` is in use, else ``None`` (loop timers).
        self.deadlines: DeadlineQueue | None = None
        self.deadline_users = 0
        #: Where the driver's own transport serves (`SocketTransport.selector_of`), else ``None``.
        self.selector = SocketTransport.selector_of(loop)

    def flush(self) -> None:
        """End of the turn: write the frames every core on ``flushes`` has gathered.

        `flush_frames` (the C speedup when built) sends each plain core's frames with one
        ``send``; what it hands back is finished here: a core for the general path (the
        transport's ``write`` buffers or reports as always), or the rest of a short or failed
        send for the transport's ``write`` (it buffers the rest, or meets the error again and
        closes the transport as its own write would). Written out in Python, 8,080 to 6,060
        instructions per delivery under callgrind; in C, with `_broadcast.deliver_frames`, 1,500.
        """
        flushes = self.flushes
        cores = flushes.copy()
        flushes.clear()
        left: list[tuple[ConnectionCore, bytes | None]] = []
        try:
            flush_frames(cores, left)
        except Exception:  # never so in practice (no memory): what was handed back, then the general way
            _core.logger.exception("writing broadcast frames failed")
            left.extend((core, None) for core in cores)
        for core, rest in left:
            try:
                if rest is None:
                    core._flush()
                else:
                    core._writer.write(rest)
            except Exception:  # one broken transport must not keep the others' frames back
                core.log.exception("writing broadcast frames failed")


def flush_frames_python(cores: list[ConnectionCore], left: list[tuple[ConnectionCore, bytes | None]]) -> None:
    """Send the frames each core has gathered when it can go straight to the socket; appended to
    ``left`` (the caller's, so that an error leaves it what was handed back before) are the cores
    left to the caller: ``(core, None)`` untouched (for `ConnectionCore._flush`), ``(core, data)``
    for the transport's ``write`` after a short or failed ``send``. Until the send, a failure puts
    the frames back in ``_out``.

    `ConnectionCore._flush` written out, and the frames handed to the socket as the transport's
    own ``write`` would when it buffers nothing and is not closed (only a ProtocolDriver sets
    ``_flushes``; ``_plain`` is the driver's own `SocketTransport`, or a transport of
    `make_socket_transport` whose attributes were found): one ``send``, without ``write``'s checks
    and call. The twin of the C speedup's ``flush_frames`` (``tests/test_broadcast_speedups.py``
    holds the two equal).
    """
    for core in cores:
        out = core._out
        if not out:
            continue
        transport: Any = core._writer
        if (
            core._socket_closed
            or core._frames_log is not None
            or transport is not core._driver._plain  # type: ignore[attr-defined]
            or transport._buffer
            or transport._conn_lost
        ):
            left.append((core, None))
            continue
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        try:
            core._bytes_out += len(data)
        except BaseException:
            out.insert(0, data)  # nothing sent: back for the caller's general path, first, as the C does
            raise
        try:
            sent = transport._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except Exception:
            left.append((core, data))  # the transport's write fails the same way and closes the transport
            continue
        if sent < len(data):
            left.append((core, data[sent:]))  # buffered by the transport's write until the socket takes it


flush_frames: Callable[[list[ConnectionCore], list[tuple[ConnectionCore, bytes | None]]], None]
try:
    from ._speedups import flush_frames
except ImportError:  # pragma: no cover - depends on the installation
    flush_frames = flush_frames_python


#: Transport types seen to have what `_LoopShared.flush` reads (``_buffer``, ``_conn_lost``, ``_sock``).
_PLAIN_TYPES: set[type] = set()


def _plain(transport: asyncio.Transport) -> bool:
    """Whether `_LoopShared.flush` may take its shortcut through ``transport`` (checked once per type);
    if a Python release renames what it reads, every write goes through ``transport.write`` (and
    ``tests/test_broadcast_flush.py`` fails, so that the loss is seen)."""
    if all(hasattr(transport, name) for name in ("_buffer", "_conn_lost", "_sock")):
        _PLAIN_TYPES.add(type(transport))
        return True
    return False


def _loop_shared(loop: asyncio.AbstractEventLoop) -> _LoopShared:
    """The calling thread's event loop's `_LoopShared` (looked up once per connection)."""
    shared: _LoopShared | None = getattr(_buffers, "shared", None)
    if shared is None or shared.loop is not loop:
        shared = _buffers.shared = _LoopShared(loop)
    return shared


@contextlib.contextmanager
def deadline_queue() -> Iterator[DeadlineQueue | None]:
    """The running event loop's `DeadlineQueue` for the ``with`` block: the connections' timers off
    the loop's heap (see ``_deadlines``); ``None`` where the loop's timers are kept instead.

    The first user of an event loop starts the queue's thread, the last one stops and joins it (a
    server's `serve` is one). Only asyncio's own loops take it: their ``time()`` is the queue's
    clock, and their pure-Python turn pays about 5,100 instructions for any timer on the heap
    (36,200 to 30,900 per echoed message under callgrind without one). Elsewhere (trio, uvloop,
    whose timers are C and cost little per turn) it yields ``None`` and the drivers use the loop's
    timers, as they do on any loop when no queue is in use.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio
        yield None
        return
    if type(loop).time is not asyncio.BaseEventLoop.time:  # another clock (uvloop)
        yield None
        return
    shared = _loop_shared(loop)
    queue = shared.deadlines
    if queue is None:
        queue = DeadlineQueue(loop)
        queue.start()
        shared.deadlines = queue
    shared.deadline_users += 1
    try:
        yield queue
    finally:
        shared.deadline_users -= 1
        if shared.deadline_users == 0:
            shared.deadlines = None  # drivers go back to loop timers; the queue hands its live ones over
            queue.stop()


def _read_buffer() -> memoryview:
    """One read buffer for every connection of the calling thread's event loop.

    asyncio calls ``get_buffer``, reads, then ``buffer_updated`` in one go,
    and the bytes are copied out at once, so the connections of one loop can
    share it: no allocation per read, no page faults, no 64 KiB per idle
    connection. Event loops in other threads get their own (a read releases
    the GIL).
    """
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(262144))
    return view


class ProtocolDriver(asyncio.BufferedProtocol):
    """Drives a connection core from asyncio's protocol callbacks; owns the socket and its transport."""

    __slots__ = (
        "_core",
        "_deadline_entry",
        "_fd",
        "_loop",
        "_lost",
        "_plain",
        "_shared",
        "_sock",
        "_timer_handle",
        "_tls",
        "_tls_handshake_timeout",
        "_transport",
        "_view",
        "_wake",
    )

    def __init__(
        self,
        core: ConnectionCore,
        sock: socket.socket,
        tls: ssl.SSLContext | None,
        tls_handshake_timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._core = core
        self._sock = sock
        self._tls = tls
        self._tls_handshake_timeout = tls_handshake_timeout
        self._view = _read_buffer()
        # Looked up once, or given by the server (the loop its acceptors run on): each
        # asyncio.get_running_loop() makes a getpid() system call (its check against a fork).
        loop = self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._timer_handle: asyncio.TimerHandle | None = None
        self._deadline_entry: list[Any] | None = None  # this driver's entry in the loop's deadline queue
        self._wake: _Wakeup | None = None
        self._transport: asyncio.Transport | None = None
        self._lost = False  # connection_lost was called: the socket is closed
        self._plain: asyncio.Transport | None = None
        self._fd = sock.fileno()  # what `steady_step` sends on through ``_plain``
        shared = self._shared = _loop_shared(loop)
        core._clock = shared.clock
        core._flushes = shared.flushes
        if tls is None:
            # The default loop: the transport is made now, as asyncio's own servers make one for
            # each accepted socket: this driver's own (`SocketTransport`), registered for reading
            # at once.
            selector = shared.selector
            if selector is not None:
                own = SocketTransport(loop, selector, sock, self, self._view, core._options.write_buffer_size)
                self._transport = self._plain = core._writer = own
                return
            # A selector loop without what `SocketTransport` needs: asyncio's transport. Its
            # callbacks run once the worker's task yields.
            transport = self._transport = make_socket_transport(loop, sock, self)
            if transport is not None:
                core._writer = transport
                # Whose write `_write` may take a shortcut through (broadcast frames).
                self._plain = transport if type(transport) in _PLAIN_TYPES or _plain(transport) else None

    def addresses(self) -> tuple[Any, Any]:
        """The peer's and the local address (from asyncio's transport when there is one: it has looked
        them up; else from the socket, once: the driver's own transport looks them up only when asked)."""
        transport = self._transport
        if transport is None or type(transport) is SocketTransport:
            sock = self._sock
            try:
                return sock.getpeername(), sock.getsockname()
            except OSError:  # the peer has gone already (ENOTCONN): each as far as it can be had
                return sockname(sock.getpeername), sockname(sock.getsockname)
        return transport.get_extra_info("peername"), transport.get_extra_info("sockname")

    # ------------------------------------------------------------- the task

    def serve(self) -> Awaitable[None]:
        """Start the module and return the task's loop; first open the transport (TLS, other loops).

        With the transport made already (the default), the module starts here
        and the worker's task awaits `_continue` directly: an idle
        connection's task holds as few frames as can be, and no cancel scope
        of its own (one is 1.7 KiB): `ConnectionCore._abort` stops it by flag
        and wake-up.
        """
        if self._tls is None and self._transport is not None:
            self._wake = _Wakeup(self._loop)
            core = self._core
            core._can_write = True
            core._feed(core._module.start(b"", {}))
            # The client's request usually came with the connection: read it now, not after the
            # loop turns that register the transport's reader and poll it (the transport reads on
            # from there; a request not there yet, or EOF, is left to it): 839,600 to 821,900
            # instructions per handshake under callgrind.
            try:
                nbytes = self._sock.recv_into(self._view)
            except OSError:  # nothing yet (EAGAIN), or an error the transport's own read reports
                nbytes = 0
            if nbytes and not core._stopped:
                self.buffer_updated(nbytes)
            return self._continue()
        return self._open_and_serve()

    async def _open_and_serve(self) -> None:
        core = self._core
        core._busy = True  # bytes arriving before the module has started wait in the backlog
        if await self._open():
            core._busy = False
            core._feed(core._module.start(b"", {}))
            await self._continue()

    async def drain(self) -> None:
        """Serve on until the module stops after ``GoingAway``."""
        await self._continue()

    async def _open(self) -> bool:
        loop = self._loop
        self._wake = _Wakeup(loop)
        self._core._can_write = True
        if self._tls is None:
            if self._transport is None:  # else made in __init__ (the default loop)
                await loop.connect_accepted_socket(lambda: self, self._sock)
            return True
        # TLS through the pump (``_tls_pump``): a plain transport below, no 256 KiB buffer per connection.
        pump = TLSPump(self._tls, self, loop)
        core = self._core
        try:
            if make_socket_transport(loop, self._sock, pump) is None:
                await loop.connect_accepted_socket(lambda: pump, self._sock)
            await pump.handshake(self._tls_handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as error:
            pump.abort()
            self._sock.close()  # closed before the slot is released
            core._tls_failed(error)
            return False
        except BaseException:  # cancelled (the server stops) during the handshake
            pump.abort()
            self._sock.close()
            core._socket_closed = core._stopped = True
            raise
        self.connection_made(pump)
        core._connection_secured(pump.ssl_object)
        pump.resume_reading()  # the bytes that came with the handshake's end, in a callback of their own
        return True

    async def _continue(self) -> None:
        """The task's part: async handler calls, input that waited, the mailbox."""
        core = self._core
        wake = self._wake
        assert wake is not None
        while not core._stopped and not (core._socket_closed and not core._busy and not core._backlog):
            core._take_mailbox()
            if core._busy:
                await core._call_async_handler()
            if core._backlog and not core._busy:
                core._take_backlog()
                continue
            if not core._busy:
                wake.clear()
                if core._stopped or core._socket_closed or core._stop_asked:
                    break
                await wake.future()

    def wake(self) -> None:
        """Wake the task."""
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------- the core's asks

    def close_socket(self) -> None:
        """Close once the buffered bytes are written."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        if self._transport is not None and not self._core._socket_closed:
            self._core._socket_closed = True
            self._transport.abort()

    def closed_now(self) -> bool:
        """`closed` when it needs no wait (the socket is closed already): ``True`` if it was done."""
        if self._lost or self._transport is None:
            self._sock.close()
            return True
        return False

    async def closed(self) -> None:
        """Close the socket and wait for ``connection_lost``; a graceful close is aborted after the linger."""
        transport = self._transport
        if self.closed_now() or transport is None:  # closed, or never wrapped (a failed TLS handshake)
            return
        if not transport.is_closing():
            transport.abort()
        wake = self._wake
        if wake is None:  # the task never ran: nothing to wait with
            transport.abort()
            return
        with anyio.move_on_after(_core.CLOSE_LINGER):
            await self._wait_lost(wake)
        if not self._lost:  # the peer does not read what is buffered: drop it
            transport.abort()
            with anyio.move_on_after(1):
                await self._wait_lost(wake)

    async def _wait_lost(self, wake: _Wakeup) -> None:
        while not self._lost:
            wake.clear()
            if self._lost:
                return
            await wake.future()

    def pause_reading(self) -> None:
        """Stop reading."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        if self._transport is not None:
            self._transport.resume_reading()

    def wake_at(self, deadline: float) -> None:
        """Wake the core at ``deadline``: through the loop's deadline queue when a server runs one,
        else one event-loop timer per connection (the earliest deadline, or before).

        The queue keeps the timer off asyncio's heap, whose mere presence costs every turn of the
        loop about 5,100 instructions (``_deadlines``).
        """
        queue = self._shared.deadlines
        if queue is not None:
            queue.add(self, deadline)
            return
        handle = self._timer_handle
        if handle is not None:
            handle.cancel()
        self._timer_handle = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._core._timers_due()

    def _deadline_due(self) -> None:
        """The deadline queue's call (`wake_at`)."""
        self._core._timers_due()

    def cancel_timer(self) -> None:
        """No more timer calls."""
        if self._deadline_entry is not None:
            queue = self._shared.deadlines
            if queue is not None:  # it always is: a queue that stops takes its entries off its targets
                queue.cancel(self)
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None

    def flush_soon(self) -> None:
        """The first core of this turn joined the event loop's ``flushes``: write them all at its end."""
        self._loop.call_soon(self._shared.flush)

    # ---------------------------------------------------- asyncio's callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The transport is ready: bound its write buffer and write through it."""
        self._transport = transport  # type: ignore[assignment]
        limit = self._core._options.write_buffer_size
        transport.set_write_buffer_limits(high=limit, low=limit // 4)  # type: ignore[attr-defined]
        self._core._writer = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        """The shared read buffer."""
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        """Bytes arrived: parsed where they lie in the steady state, else a copy goes to the core."""
        core = self._core
        if not (core._steady_ok or core._steady_check()):  # one test per read while the connection stays steady
            core._input("data", bytes(self._view[:nbytes]))
            return
        # `ConnectionCore._steady_read` written out, and the transport passed for the reply's
        # direct ``send``: the idle timer, the parse, the handler's calls, the counters, the state
        # and the write in one C call (`steady_step`), None back in the common case: 26,000
        # instructions per echoed 64 B message under callgrind (``benchmarks/instructions.py``),
        # 28,700 with that Python here.
        answer = steady_step(core, self._view, nbytes, self._plain, self._fd)
        if answer is not None:
            core._steady_answer(answer, self._view, nbytes)

    def eof_received(self) -> bool:
        """The peer's end: close the transport once the core is done with it."""
        self._core._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed: let go of the transport (a TLS transport's protocol keeps this
        driver's ``get_buffer``, so holding it back would make a cycle that only a full garbage
        collection frees, with its 256 KiB buffer)."""
        self._lost = True
        self._transport = self._plain = None
        core = self._core
        core._writer = _core.NOWHERE
        core._on_lost()

    def tls_error(self, error: BaseException) -> None:
        """A TLS error once secured (the peer's alert, a bad record): the pump drops the socket."""
        core = self._core
        core.log.debug("TLS error: %r", error)  # repr: an alert's text is the peer's, escaped
        _core.bad_input("TLS errors", f"{core._peer_text}: {error!r}", core._context())

    def pause_writing(self) -> None:
        """The write buffer is above its bound: stop reading and let actions wait."""
        core = self._core
        core._can_write = False
        core._pause_reading()

    def resume_writing(self) -> None:
        """The write buffer drained: read again, carry out the actions that waited."""
        core = self._core
        core._can_write = True
        core._take_mailbox()  # now: the task may be an async handler's, waiting for room for its own sends
        core._resume_reading()
        self.wake()
