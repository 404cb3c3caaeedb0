"""The connection core: one connection's life, whatever carries its bytes.

(Longer than the project's usual 500 lines on purpose: everything that moves
the connection through the state table below lives in this one file, so that
a reader finds every transition in one place. The handler calls, which move
no state, are in ``_handler_calls``; the I/O in the drivers.)

Theory of operation
-------------------
A connection is served by a *core* (this module: the handler contract, the
effects of the protocol module, timers, the mailbox, the connection's life)
and a *driver* (one module per I/O path: ``_asyncio_driver`` for asyncio's
protocol callbacks, ``_trio_driver`` for plain sockets on trio, ``_stream_driver``
for anyio streams: TLS on trio, any other backend). The core holds no socket, transport or event-loop object; it sees
only the `Driver` interface below, and the driver reports to the core by
calling its ``_on_*`` and ``_input`` methods. Everything the core decides, it
decides synchronously: input goes in (`ConnectionCore._input`), effects are
carried out in order (`ConnectionCore._run_queue`), the bytes they write are
gathered in ``_out`` and handed to the driver in one piece per batch
(`ConnectionCore._flush`). Only a call to an ``async`` handler callback needs
a task: the core marks itself busy, asks the driver to pause reading, and
the driver's task runs `ConnectionCore._call_async_handler`.

The connection's life, every transition (``WorkerState``; the same on every
path, the driver named where it acts):

==============  ========================================================  ============
state           event                                                     next state
==============  ========================================================  ============
HANDSHAKING     the module switches to a non-handshake module             SERVING
HANDSHAKING     the module stops (refused, timed out, peer left), or the  DONE
                TLS handshake fails, or the connection is aborted
SERVING         the module stops (closing handshake done, EOF), or the    DONE
                connection is aborted (`ConnectionCore._abort`)
HANDSHAKING,    the server stops (cancellation): ``GoingAway`` to the     DRAINING
SERVING         module, then the driver keeps reading until the deadline
DRAINING        the module stops, the socket closes or the deadline       DONE
DONE            (end of `ConnectionCore._finish`) the driver has closed   (released)
                the socket (a graceful close that cannot finish is
                aborted after ``CLOSE_LINGER``), the handler was told
                ``connection_close`` once if ``init`` succeeded; then
                the slot is released
==============  ========================================================  ============

Whatever ends the connection, `ConnectionCore._finish` runs: the handler's
``connection_close`` runs exactly once if ``init`` succeeded, the driver
closes the socket, and only then is the connection's slot released.

Rules kept here for speed (measured, see ``benchmarks/``): slots and no
per-message allocation; sync handlers run inside the driver's read callback
with no task switch; the replies of one read go out in one write; the write
is the asyncio transport's own ``write`` (the core's ``_writer`` is the
transport there) and the clock the event loop's, with no call in between.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import ConnectionClosed
from ._handler import HandlerModule
from ._handler_calls import HandlerCalls, _run_async, _run_sync, bad_input
from ._messages import ConnectionClose
from ._options import WorkerOptions
from .protocols import (
    Action,
    BroadcastAction,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    Effect,
    GoingAway,
    ProtocolModule,
    SendAction,
    SetTimer,
    Stop,
    Switch,
    TLSInfo,
    Write,
)
from .protocols._frames import (
    STEADY_PARSED,
    STEADY_RAISED,
    STEADY_RESULT,
    steady_step,
)
from .supervision import cleanup_scope, groups

__all__ = ["ConnectionCore", "ConnectionLogger", "Driver", "Observer", "WorkerState", "bad_input", "describe_output"]

logger = logging.getLogger("pywsserver.worker")
#: Every frame written and message delivered, at DEBUG (checked once per connection: free when off).
frames_logger = logging.getLogger("pywsserver.frames")
_connection_ids = itertools.count(1)
#: Seconds a socket closing gracefully gets to send what is still buffered before it is aborted.
CLOSE_LINGER = 5.0
_INFINITY = float("inf")


class WorkerState(enum.Enum):
    """Where a worker is in its life (see the table in ``pywsserver._core``)."""

    HANDSHAKING = "handshaking"
    SERVING = "serving"
    DRAINING = "draining"
    DONE = "done"


# The members as module globals, read so in the per-connection paths: on Python 3.11 reading a
# member from its Enum class goes through ``EnumType.__getattr__`` (about 1,000 instructions under
# callgrind, a global read a few dozen). With the same in the modules and the supervisor (25 such
# reads per connection): 558,600 to 533,000 instructions per handshake, benchmarks/instructions.py
# --mode handshake.
_HANDSHAKING, _SERVING, _DRAINING, _DONE = (
    WorkerState.HANDSHAKING,
    WorkerState.SERVING,
    WorkerState.DRAINING,
    WorkerState.DONE,
)


class Driver(Protocol):
    """What the core asks of the driver that carries a connection's bytes.

    Besides these, a driver sets the core's ``_writer`` (a `Writer`: the
    asyncio transport itself, or the stream driver, which queues the bytes
    for its task) and ``_clock`` (the event loop's clock, in the seconds
    `anyio.current_time` uses; a function shared by every connection).
    """

    def addresses(self) -> tuple[Any, Any]:
        """The peer's and the local address, as the socket gives them (``None`` when unknown)."""

    def serve(self) -> Awaitable[None]:
        """What serves the connection until it ends (TLS handshake, ``start`` of the module, reading).

        A driver may start the module here and return the coroutine that goes
        on: the worker's task awaits it directly, one coroutine frame fewer
        for every idle connection.
        """

    async def drain(self) -> None:
        """After ``GoingAway`` was fed: write what it produced and read until the module stops."""

    def close_socket(self) -> None:
        """Close the socket once what was handed to the writer is written (the `CloseSocket` effect)."""

    def abort(self) -> None:
        """Drop the connection now; mark the core's socket closed once it is."""

    async def closed(self) -> None:
        """At the end: close the socket and return once it is closed, within a bounded time.

        A socket never asked to close is aborted; a graceful close in progress
        (`close_socket`) gets `CLOSE_LINGER` seconds to send what is buffered,
        then is aborted: a peer that does not read cannot hold the socket open.
        """

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading` (the core is busy or the peer does not read)."""

    def resume_reading(self) -> None:
        """Read again."""

    def wake(self) -> None:
        """Wake the driver's task: an async handler call, queued input or mailbox actions wait."""

    def wake_at(self, deadline: float) -> None:
        """Call the core's ``_timers_due`` at ``deadline`` (the earliest timer moved earlier)."""

    def cancel_timer(self) -> None:
        """The connection ends: no more timer calls."""

    def flush_soon(self) -> None:
        """Call the core's ``_flush`` at the end of this event-loop turn (broadcast frames).

        A driver that sets the core's ``_flushes`` (a list shared by the event loop's connections)
        is asked only by the first core of a turn to join it: it then flushes every core on it.
        """


class Observer(Protocol):
    """Told of each connection's start and end (the server's access log and metrics)."""

    def started(self, core: ConnectionCore) -> None:
        """The connection's worker began to serve it."""

    def ended(self, core: ConnectionCore) -> None:
        """The connection has ended (socket closed, handler told), just before its slot is released."""


class ConnectionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the connection id and peer, and adds them as attributes."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Add the connection's context to the record."""
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[conn {extra.get('connection_id')} {extra.get('peer')}] {msg}", kwargs


def _address(raw: Any) -> tuple[str, int] | None:
    if isinstance(raw, tuple) and len(raw) >= 2:
        if len(raw) == 2 and type(raw[0]) is str and type(raw[1]) is int:
            return raw  # IPv4 as the socket gives it: no copy
        return (str(raw[0]), int(raw[1]))
    return None


class Writer(Protocol):
    """Where the core's output goes: ``write(data)`` takes it now, never blocks."""

    def write(self, data: bytes) -> None:
        """Write (or queue) ``data``."""


class _Nowhere:
    """The writer until the driver has somewhere to write."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        """Drop ``data``."""


NOWHERE = _Nowhere()


def _size(action: Action) -> int:
    """The bytes a queued action holds (its message's; control actions count as nothing)."""
    kind = type(action)
    if kind is SendAction:
        return len(action.data)  # type: ignore[union-attr]
    if kind is BroadcastAction:
        return len(action.frame)  # type: ignore[union-attr]
    return 0


class _Ended:
    """The driver of a connection that has ended: asks nothing, does nothing.

    The core lets go of its real driver at the end, so that the two (which
    refer to each other while the connection lives) are freed by reference
    counting, not by a later garbage collection pass.
    """

    __slots__ = ()

    def addresses(self) -> tuple[Any, Any]:
        return None, None

    def serve(self) -> Awaitable[None]:
        return self.drain()

    async def drain(self) -> None:
        pass

    async def closed(self) -> None:
        pass

    def close_socket(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def wake_at(self, deadline: float) -> None:
        pass

    def cancel_timer(self) -> None:
        pass

    def flush_soon(self) -> None:
        pass


_ENDED = _Ended()


class ConnectionCore(HandlerCalls):
    """One connection's core; `pywsserver.Worker` is its public face (see the module docstring)."""

    # Slots: a connection's core lives as long as the connection; no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_aborted",
        "_backlog",
        "_busy",
        "_bytes_in",
        "_bytes_out",
        "_can_write",
        "_clock",
        "_debug",
        "_driver",
        "_eof_seen",
        "_flushes",
        "_frames_log",
        "_log",
        "_log_context",
        "_mailbox_full",
        "_mailbox_receive",
        "_mailbox_send",
        "_module",
        "_module_config",
        "_observer",
        "_options",
        "_out",
        "_queue",
        "_queued_bytes",
        "_raw_module",
        "_reading_paused",
        "_release",
        "_room",
        "_socket_closed",
        "_started_at",
        "_steady",
        "_steady_idle",
        "_steady_limit",
        "_steady_ok",
        "_stop_asked",
        "_stopped",
        "_timers",
        "_token",
        "_wake_at",
        "_writer",
        "connection",
        "connection_id",
        "state",
    )

    _driver: Driver
    _module: ProtocolModule

    def __init__(
        self,
        options: WorkerOptions,
        release: Callable[[], None] | None = None,
        token: anyio.lowlevel.EventLoopToken | None = None,
    ) -> None:
        self._options = options
        self._release = release
        # Effects still to carry out, as a stack: the next one is at the end (a list, not a deque:
        # an empty deque holds 760 bytes, and every connection has this queue for its whole life).
        self._queue: list[Effect] = []
        self._out: list[bytes] = []
        self._writer: Writer = NOWHERE
        self._clock: Callable[[], float] = anyio.current_time
        self._backlog: deque[Any] | None = None  # made when input must wait
        self._busy = False
        self._reading_paused = False
        self._eof_seen = False
        self._can_write = False  # the driver takes more output now (asyncio: its buffer is below the bound)
        # The mailbox is made when an action first has to wait.
        self._mailbox_send: MemoryObjectSendStream[Action] | None = None
        self._mailbox_receive: MemoryObjectReceiveStream[Action] | None = None
        # Bytes of the messages waiting in the mailbox: ``await send`` waits while they reach
        # ``write_buffer_size`` (whatever the message sizes), until the driver takes some (``_room``).
        self._queued_bytes = 0
        self._room: anyio.Event | None = None
        # Timers are deadlines by name; the driver is asked to wake the core at the earliest (``_wake_at``).
        self._timers: dict[str, float] = {}
        self._wake_at = _INFINITY
        self._socket_closed = False
        self._stopped = False
        self._handler: HandlerModule | None = None
        self._handler_object: Any = None
        self._handler_state: Any = None
        self._opened = False
        self._told_close = False
        # For the thread-safe calls; the server passes its own (all its workers share the event loop).
        self._token = token
        self._aborted: ConnectionClose | None = None
        # The supervisor asked the worker to stop (`_stop_by_supervisor`): the driver's task ends its
        # serving as a cancellation would end it, then the worker drains.
        self._stop_asked = False
        #: Where the worker is in its life.
        self.state = _HANDSHAKING
        #: Unique within the process; appears in every log line of the connection.
        self.connection_id = next(_connection_ids)
        # Log levels are looked at once per connection: a debug line that is off costs one test.
        self._debug = logger.isEnabledFor(logging.DEBUG)
        self._log: ConnectionLogger | None = None  # made at the first line logged
        self._log_context: dict[str, Any] | None = None
        self._frames_log: ConnectionLogger | None = None
        # The module, if it has a ``raw_frames`` flag (whether a broadcast's ready-made frame may be
        # written as is, kept up to date by the module), else ``None``: every broadcast is queued.
        self._raw_module: Any = None
        # The event loop's cores with broadcast frames to write at the end of the turn (set by a
        # driver that gathers them, see `_broadcast_now`), or ``None``: `Driver.flush_soon` per core.
        self._flushes: list[ConnectionCore] | None = None
        # The steady path (`_steady_read`): the module's ``steady_parameters``, if it has one; whether
        # the last `_steady_check` found the connection steady and nothing has happened since (see
        # there); and the parameters that check found.
        self._steady: Callable[[], tuple[int, float | None] | None] | None = None
        self._steady_ok = False
        self._steady_limit = 0
        self._steady_idle: float | None = None
        # What the connection carried, for the access log and the metrics (plain integers: no cost to speak of).
        self._bytes_in = self._bytes_out = self._messages_in = self._messages_out = 0
        self._handler_errors = self._mailbox_full = 0
        self._path: str | None = None
        self._subprotocol: str | None = None
        self._close: ConnectionClose | None = None
        self._started_at = 0.0
        #: Told when the connection starts and ends (the server's access log and metrics), or ``None``.
        self._observer: Observer | None = None

    def _attach(self, driver: Driver, addresses: tuple[Any, Any] | None = None) -> None:
        """Take ``driver`` as the connection's driver and make the first protocol module; ``addresses``:
        the peer's and the local address as ``(host, port)`` (or ``None``) if the acceptor knows them,
        else the driver is asked."""
        self._driver = driver
        try:
            if addresses is None:
                peer_raw, local_raw = driver.addresses()
                peer, local = _address(peer_raw), _address(local_raw)
            else:
                peer, local = addresses
            # Positional: a class called with keywords builds a dict of them (about 1,000 instructions).
            self.connection = ConnectionInfo(peer, local, self.connection_id)
            # The connection logs its traffic if ``pywsserver.frames`` is at DEBUG when it is accepted.
            if frames_logger.isEnabledFor(logging.DEBUG):
                self._frames_log = ConnectionLogger(frames_logger, self._context())
            initial = self._options.modules[self._options.initial_module]
            self._module_config = initial
            self._set_module(initial.module(initial.options, self.connection))
        except BaseException:
            # No module: the core takes no input (the driver's connection_lost comes after), and a
            # transport made already would keep the socket registered.
            self._stopped = True
            driver.abort()
            raise

    def __repr__(self) -> str:
        return f"<Worker {self.connection_id} {self.connection.peer} {self.state.value}>"

    @property
    def log(self) -> ConnectionLogger:
        """The connection's logger: every record carries ``connection_id`` and ``peer``."""
        log = self._log
        if log is None:
            log = self._log = ConnectionLogger(logger, self._context())
        return log

    def _context(self) -> dict[str, Any]:
        context = self._log_context
        if context is None:
            peer = self.connection.peer
            context = {"connection_id": self.connection_id, "peer": f"{peer[0]}:{peer[1]}" if peer else "?"}
            self._log_context = context
        return context

    @property
    def _peer_text(self) -> str:
        peer = self.connection.peer
        return f"{peer[0]}:{peer[1]}" if peer else "unix socket"

    @property
    def alive(self) -> bool:
        """Whether the connection is still up (sending may still fail once closing has begun)."""
        return not self._stopped and not self._socket_closed and self._aborted is None

    # ------------------------------------------------------ mailbox and backpressure

    def _mailbox(self) -> tuple[MemoryObjectSendStream[Action], MemoryObjectReceiveStream[Action]]:
        """The mailbox, made on first use (most connections never need one)."""
        if self._mailbox_send is None or self._mailbox_receive is None:
            if self.state is _DONE:
                raise ConnectionClosed(f"{self!r} is closed")
            self._mailbox_send, self._mailbox_receive = anyio.create_memory_object_stream[Action](
                self._options.mailbox_size
            )
        return self._mailbox_send, self._mailbox_receive

    def _offer(self, action: Action) -> bool:
        """Queue ``action`` without waiting; ``False`` when the mailbox is full (``mailbox_size`` actions).

        Broadcasts count actions, not bytes: a member that keeps up must not miss broadcasts of
        large messages. ``await send`` and ``send_nowait`` also look at the bytes queued.
        """
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        if self._act_now(action):
            return True
        try:
            self._mailbox()[0].send_nowait(action)
        except anyio.WouldBlock:
            self._mailbox_full += 1
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None
        self._queued_bytes += _size(action)
        self._driver.wake()
        return True

    async def _put(self, action: Action) -> None:
        """Queue ``action``, waiting while the mailbox is full."""
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        if self._act_now(action):
            await anyio.lowlevel.checkpoint()
            return
        mailbox = self._mailbox()[0]
        waited = False
        while self._queued_bytes >= self._options.write_buffer_size:
            room = self._room
            if room is None:
                room = self._room = anyio.Event()
            self._driver.wake()
            await room.wait()
            waited = True
            if not self.alive:
                raise ConnectionClosed(f"{self!r} is closed")
        if waited and self._act_now(action):  # the mailbox was emptied meanwhile: nobody might take it now
            return
        size = _size(action)
        self._queued_bytes += size
        try:
            mailbox.send_nowait(action)
        except anyio.WouldBlock:
            self._driver.wake()
            try:
                await mailbox.send(action)
            except BaseException as error:
                self._queued_bytes -= size
                if isinstance(error, anyio.ClosedResourceError | anyio.BrokenResourceError):
                    raise ConnectionClosed(f"{self!r} is closed") from None
                raise
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._queued_bytes -= size
            raise ConnectionClosed(f"{self!r} is closed") from None
        else:
            if not waited:
                await anyio.lowlevel.checkpoint()
        self._driver.wake()

    def _took(self, action: Action) -> None:
        """The driver took ``action`` from the mailbox: its bytes no longer count, senders may go on."""
        self._queued_bytes -= _size(action)
        room = self._room
        if room is not None and self._queued_bytes < self._options.write_buffer_size:
            self._room = None
            room.set()

    def _act_now(self, action: Action) -> bool:
        """Carry ``action`` out at once when nothing is queued before it and the peer reads.

        This keeps the order of the mailbox (it must be empty) and its bound
        (a peer that does not read makes actions queue), without a task switch.
        """
        if not self._writable_now():
            return False
        self._act(action)
        return True

    def _writable_now(self) -> bool:
        """The driver takes more output now and no action waits in the mailbox before new output."""
        mailbox = self._mailbox_send
        return self._can_write and not (mailbox is not None and mailbox.statistics().current_buffer_used)

    def _broadcast_now(self, frame: bytes) -> bool:
        """Write a broadcast's ready-made frame now, if nothing must come before it.

        ``False`` when the frame cannot go out as is (a driver that cannot take it now, actions
        waiting in the mailbox, a module that encodes per connection): then the caller queues it.

        Called once per member and broadcast, so it makes no call of its own but the mailbox's
        when there is one: the module's answer is its ``raw_frames`` flag, which it keeps up to
        date (no call of its ``raw_frames_ok`` per member), and the frame is written at the end of
        the event-loop turn with every other core's, from the loop's ``_flushes`` (one loop
        callback per turn, not one per member): 12,300 to 9,400 instructions per delivery under
        callgrind (``benchmarks/instructions.py --mode broadcast``), then with the flag and the
        write in the flush itself, 8,080 to 6,060. `_broadcast.deliver_frames` does this for every
        member of a broadcast in one call (C when built), leaving to this method only the unusual:
        with the flush in C too, 5,950 to 1,500 (on trio, the frame sent in the same call: 1,150).
        """
        module = self._raw_module
        if module is None or not module.raw_frames or self._socket_closed or self._stopped or not self._can_write:
            return False
        mailbox = self._mailbox_send
        if mailbox is not None and mailbox.statistics().current_buffer_used:
            return False
        out = self._out
        self._messages_out += 1
        if not out:
            # Nothing gathered yet: written at the end of this loop turn, with the other broadcasts'
            # frames of the same turn for this connection (one system call for a burst, not one
            # each). A connection with a reply gathered already writes the frame after it.
            flushes = self._flushes
            if flushes is None:
                out.append(frame)
                self._driver.flush_soon()
                return True
            if not flushes:
                self._driver.flush_soon()  # the turn's first: one callback writes them all
            flushes.append(self)
        out.append(frame)
        return True

    def _take_mailbox(self, bounded: bool = True) -> None:
        """Carry out queued actions while the peer reads (for a driver with no mailbox task); not
        ``bounded``, all of them, whatever the driver holds already."""
        mailbox = self._mailbox_receive
        while mailbox is not None and not self._stopped and (self._can_write or not bounded):
            try:
                action = mailbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            self._took(action)
            self._act(action)

    def _act(self, action: Action) -> None:
        """Carry out an action's effects at once; actions never call the handler."""
        self._steady_ok = False  # the module may change (a close, a ping): `_steady_check` again
        for effect in self._module.action(action):
            if type(effect) is Deliver:
                raise RuntimeError(f"{type(self._module).__name__}.action() returned Deliver, which it may not")
            more = self._execute(effect)
            if more:
                self._feed(more)
            self._flush()

    def _abort(self, code: int, reason: str) -> None:
        """Drop the connection now, without a closing handshake; the handler is told ``code``."""
        if not self.alive:
            return
        self._aborted = ConnectionClose(code, reason)
        self._steady_ok = False
        self.log.warning("closing the connection: %s", reason)
        # The driver drops the socket; the task sees the core stopped and ends (after an async
        # handler call in progress returns), then tells the handler.
        self._stopped = True
        self._driver.abort()
        self._driver.wake()

    # ------------------------------------------------------------------ input

    def _input(self, kind: str, value: Any) -> None:
        """Input from the driver or a timer: handled now, or queued while the core is busy."""
        if self._stopped:
            return
        if self._busy or self._backlog:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append((kind, value))
            self._pause_reading()
            self._driver.wake()
            return
        self._dispatch(kind, value)

    def _set_module(self, module: ProtocolModule) -> None:
        """Make ``module`` the connection's protocol module, its ``steady_parameters`` looked up once."""
        self._steady_ok = False
        self._module = module
        self._steady = getattr(module, "steady_parameters", None)
        self._raw_module = module if hasattr(module, "raw_frames") else None

    def _steady_check(self) -> bool:
        """Whether the next read may take `_steady_read`; sets ``_steady_ok`` when it may.

        The steady state: nothing queued or waiting, the socket open, a sync handler past ``init``,
        no frame log, and a module that has ``steady_parameters`` and finds itself steady too (the
        WebSocket module: open, no frame carried over, no message waiting, no compression).
        ``_steady_ok`` then spares the next reads these dozen tests: it is set here only, and
        cleared by every method through which the core's or the module's state can change
        (`_feed`, `_act`, `_abort`, `_set_module`, `_on_lost`, `_tls_failed`, `_finish`), so
        that it is true only while nothing has happened since this check but steady reads.
        """
        handler = self._handler
        steady = self._steady
        if (
            steady is None
            or self._busy
            or self._stopped
            or self._socket_closed
            or self._backlog
            or self._queue
            or self._frames_log is not None
            or handler is None
            or not self._opened
            or handler.async_handle
        ):
            return False
        parameters = steady()
        if parameters is None:
            return False
        self._steady_limit, self._steady_idle = parameters
        self._steady_ok = True
        return True

    def _steady_read(self, buffer: memoryview, nbytes: int) -> None:
        """The first ``nbytes`` of ``buffer`` read in the steady state (`_steady_check`), parsed where
        they lie and handled without effect objects.

        One call of `steady_step` (C, or its pure-Python twin) restarts the idle timer, parses the
        frames, hands each message to ``handle`` and answers the two commonest results, ``("reply",
        data, state)`` and ``("noreply", state)``, with frames appended to ``_out``, and then
        stores the state, counts and writes ``_out`` in one piece (the asyncio driver passes its
        transport for a direct ``send``).
        It stops at anything else: a read that is not only whole text and binary frames goes to the
        module as `data_received` would have it (the parse is not done twice); another result, an
        exception, or a call after which ``_steady_ok`` is false (the handler closed the connection,
        sent, ...) goes on through the general path from that message on, as if it had come that way
        (`_handled`, `_feed`). Frames the handler's calls write meanwhile (``send``, broadcasts)
        go through ``_out`` too, so the order is kept.

        What it buys: no copy of the read, no ``Deliver``/``Write``/``Reply`` objects, queue or inbox
        per message, and no Python frame but this one and ``handle`` between the read and the
        write: a 64-byte echoed message went from 72,300 to 47,000 instructions under callgrind with
        the effect objects gone, then from 46,200 to 35,900 with the parse, the calls and the
        replies in one C call (``benchmarks/instructions.py``; on uvloop 22,600 to 12,500), and
        with the counters, the state and the write in that call too, 28,700 to 26,000.
        ``tests/test_steady_path.py`` holds it to the general path with hypothesis.
        """
        answer = steady_step(self, buffer, nbytes, None, -1)
        if answer is not None:
            self._steady_answer(answer, buffer, nbytes)

    def _steady_answer(self, answer: tuple[Any, ...], buffer: memoryview, nbytes: int) -> None:
        """What `steady_step` answered for a read of ``nbytes`` in ``buffer`` when it did not answer
        every message itself: the parse, or where it stopped, carried on by the general path."""
        kind = answer[0]
        module: Any = self._module  # the WebSocket module (its steady_* methods are not in the contract)
        if kind == STEADY_PARSED:
            self._feed(module.steady_parsed(bytes(buffer[:nbytes]), answer[1]))
            return
        self._handler_state = answer[1]
        count = answer[2]
        self._messages_in += count
        if answer[3]:
            module.messages_out += answer[3]
        # The general path, from the message of the last call on.
        items = answer[4]
        message = items[count - 1]
        module.steady_resume(message, items[count:])
        if kind == STEADY_RESULT:
            self._feed(self._handled(message, answer[5]))
        elif kind == STEADY_RAISED:
            self._report(f"raised in handle({message!r:.80})", answer[5])
            self._feed(module.handler_failed(answer[5]))
        else:  # not an Exception (KeyboardInterrupt, a cancellation): raised again, as handle raised it
            self._steady_ok = False
            raise answer[5]

    def _dispatch(self, kind: str, value: Any) -> None:
        if self._frames_log is not None:
            self._frames_log.debug(
                "received %d bytes" if kind == "data" else "%s", len(value) if kind == "data" else kind
            )
        if kind == "data":
            self._bytes_in += len(value)
            self._feed(self._module.data_received(value))
        elif kind == "eof":
            self._feed(self._module.eof_received())
        else:
            self._feed(self._module.timer_expired(value))

    def _take_backlog(self) -> None:
        backlog = self._backlog
        if backlog is None:
            return
        while backlog and not self._busy and not self._stopped:
            self._dispatch(*backlog.popleft())
        if not backlog:
            self._resume_reading()

    def _on_eof(self) -> None:
        """The driver saw the peer's end of the stream."""
        if not self._eof_seen:
            self._eof_seen = True
            self._input("eof", None)

    def _on_lost(self) -> None:
        """The driver's socket is closed (by either side)."""
        self._steady_ok = False
        self._socket_closed = True
        self._on_eof()
        self._driver.wake()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._socket_closed:
            self._reading_paused = True
            self._driver.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._busy
            and not self._backlog
            and self._can_write
            and not self._socket_closed
        ):
            self._reading_paused = False
            self._driver.resume_reading()

    # ---------------------------------------------------------------- timers

    def _set_timer(self, name: str, seconds: float | None) -> None:
        """(Re)start or stop a timer; only an earlier deadline costs a call to the driver.

        The connection's timers are deadlines in ``_timers``; the driver wakes
        the core at ``_wake_at``, the earliest deadline it was given, or before.
        Stopping a timer, or moving it later (``idle_timeout`` does on every
        read), only changes its deadline; a wake-up that finds nothing due
        asks for the next deadline.
        """
        if seconds is None:
            self._timers.pop(name, None)
            return
        deadline = self._clock() + seconds
        self._timers[name] = deadline
        if deadline < self._wake_at:
            self._wake_at = deadline
            self._driver.wake_at(deadline)

    def _timers_due(self) -> None:
        """The driver's wake-up: expire the timers that are due, ask for the next deadline."""
        self._wake_at = _INFINITY
        timers = self._timers
        if not timers:
            return
        now = self._clock()
        for deadline, name in sorted((deadline, name) for name, deadline in timers.items() if deadline <= now):
            if timers.get(name) == deadline and not self._stopped:  # not moved or stopped by an earlier one
                del timers[name]
                self._input("timer", name)
        if timers and self._wake_at == _INFINITY and self.state is not _DONE:
            self._wake_at = deadline = min(timers.values())
            self._driver.wake_at(deadline)

    # --------------------------------------------------------------- effects

    def _feed(self, effects: list[Effect]) -> None:
        """Queue effects and carry out all that need no task; a call to an async handler wakes the task."""
        self._steady_ok = False  # the module and the core may change: `_steady_check` again
        if effects:
            self._queue[0:0] = effects[::-1]  # after whatever is still pending
        self._run_queue()
        self._flush()

    def _flush(self) -> None:
        """Hand what the effects produced to the driver in one piece: one write for a batch of replies."""
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if self._frames_log is not None:
                self._frames_log.debug("sent %s", describe_output(data))
            if not self._socket_closed:
                self._bytes_out += len(data)
                self._writer.write(data)

    def _run_queue(self) -> None:
        queue = self._queue
        while queue and not self._busy and not self._stopped:
            effect = queue.pop()
            if type(effect) is Deliver:
                message = effect.message
                handler = self._handler
                if (
                    (type(message) is str or type(message) is bytes)
                    and handler is not None
                    and self._opened
                    and not handler.async_handle
                ):
                    queue.extend(reversed(self._handle_sync(message)))  # the common case, without steps
                    continue
                if self._needs_task(message):
                    queue.append(effect)
                    self._busy = True
                    self._pause_reading()
                    self._driver.wake()
                    return
                queue.extend(reversed(_run_sync(self._deliver_steps(effect.message))))
            else:
                more = self._execute(effect)
                if more:
                    queue.extend(reversed(more))

    def _execute(self, effect: Effect) -> list[Effect] | None:
        """Carry out one effect other than Deliver."""
        kind = type(effect)
        if kind is Write:
            if not self._socket_closed:
                self._out.append(effect.data)  # type: ignore[union-attr]  # written together by _flush
        elif kind is SetTimer:
            if effect.seconds is None:  # type: ignore[union-attr]
                self._timers.pop(effect.name, None)  # type: ignore[union-attr]  # stopped: `_set_timer` without the call
            else:
                self._set_timer(effect.name, effect.seconds)  # type: ignore[union-attr]
        elif kind is CloseSocket:
            if not self._socket_closed:
                self._flush()
                self._socket_closed = True
                self._driver.close_socket()
        elif kind is Stop:
            self._flush()
            self._stopped = True
            self._queue.clear()
            self._stopping(effect)  # type: ignore[arg-type]
            self._driver.wake()
        elif kind is Switch:
            return self._switch(effect)  # type: ignore[arg-type]
        else:
            raise TypeError(f"{type(self._module).__name__} returned an unknown effect {effect!r}")
        return None

    def _stopping(self, stop: Stop) -> None:
        # Reasons may carry what the client sent: logged escaped (%r), so that no client forges a line.
        if self._debug:
            self.log.debug("stopping: %r", stop.reason)
        if stop.bad_input:  # the module closed because the client broke the protocol
            kind = "bad handshakes" if self.state is _HANDSHAKING else "protocol violations"
            bad_input(kind, f"{self._peer_text}: {stop.reason!r}", self._context())

    def _switch(self, switch: Switch) -> list[Effect]:
        config = self._options.modules.get(switch.module)
        if config is None:
            raise RuntimeError(f"{type(self._module).__name__} switched to unknown protocol module {switch.module!r}")
        self._timers.clear()  # the driver's wake-up stays; it finds nothing due
        self._module_config = config
        self._set_module(config.module(config.options, self.connection))
        if not getattr(config.module, "handshake", False) and self.state is _HANDSHAKING:
            self.state = _SERVING
        if self._debug:
            self.log.debug("switched to %s", config.name)
        return self._module.start(switch.data, switch.context)

    async def _call_async_handler(self) -> None:
        """The driver's task: make the async handler call the queue waits on, then go on with the queue."""
        effect = self._queue.pop()
        assert type(effect) is Deliver
        more = await _run_async(self._deliver_steps(effect.message))
        self._busy = False
        if self._mailbox_receive is not None:
            self._take_mailbox(bounded=False)  # the sends the handler queued go out before its reply
        self._queue.extend(reversed(more))
        self._run_queue()
        self._flush()
        self._resume_reading()

    # -------------------------------------------------------------------- TLS

    def _tls_failed(self, error: BaseException) -> None:
        """The driver's TLS handshake failed (it has dropped the socket)."""
        # Scanners and stalled clients fail here all the time: not worth more than a debug line.
        self.log.debug("TLS handshake failed: %r", error)
        bad_input("failed TLS handshakes", f"{self._peer_text}: {error!r}", self._context())
        self._steady_ok = False
        self._socket_closed = True
        self._stopped = True

    def _connection_secured(self, ssl_object: Any) -> None:
        """Record the TLS session in the connection info, before any protocol module sees it."""
        cipher = ssl_object.cipher() if ssl_object is not None else None
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        info = TLSInfo(
            version=ssl_object.version() if ssl_object is not None else None,
            cipher=cipher[0] if cipher else None,
            peer_certificate=certificate or None,
            server_name=getattr(ssl_object, "server_hostname", None),
        )
        self.connection = attrs.evolve(self.connection, tls=info)
        self._set_module(self._module_config.module(self._module_config.options, self.connection))

    # ------------------------------------------------------------ life and end

    async def run(self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; the worker supervisor's start function calls it."""
        if self._token is None:
            self._token = anyio.lowlevel.current_token()
        set_stop = getattr(task_status, "set_stop", None)
        if set_stop is not None:
            set_stop(self._stop_by_supervisor)
        task_status.started(self)
        if self._debug:
            self.log.debug("accepted")
        observer = self._observer
        if observer is not None:
            self._started_at = self._clock()
            observer.started(self)
        try:
            await self._driver.serve()
        finally:
            if not (self._stopped or self._socket_closed or self._aborted is not None):
                with cleanup_scope():  # made only when there is something to drain (a timer each)
                    await self._drain()
                # Drained, or cut at the shutdown deadline: the module reads nothing more, so that the
                # socket's close is not taken for the peer's going (1006), whatever the handler's kind
                # and backend: the handler is told 1001 "server shutting down" by `_finish`.
                self._stopped = True
            await self._finish()

    def _stop_by_supervisor(self) -> None:
        """The worker supervisor's stop, where its workers stop cooperatively (asyncio, plain TCP,
        sync handlers: see ``Server``): the driver's task leaves its serving at once, as a
        cancellation would make it, and the worker drains. The worker's task then awaits nothing but
        the driver's wake-up (its handler calls are sync), so nothing is left to interrupt. A second
        call may be the supervisor's kill (its shutdown time is up): the child context has cancelled
        the drain's cleanup scope already (or made its deadline now, if the drain has not begun), so
        a call while draining does nothing: the drain ends as a cancelled worker's would, at the
        peer's answer or at the deadline, even when the supervisor asks again (its group stopping)."""
        if self.state is _DRAINING:
            return
        self._stop_asked = True
        self._driver.wake()

    async def _drain(self) -> None:
        """Cancelled while the connection is up: say going away and wait for the peer's close."""
        self._stop_asked = False  # asked to stop: now drain (further asks do nothing, see `_stop_by_supervisor`)
        self.state = _DRAINING
        if self._debug:
            self.log.debug("draining")
        self._busy = False  # a handler call in progress was cancelled with the worker
        self._queue.clear()
        self._feed(self._module.action(GoingAway()))
        self._resume_reading()
        await self._driver.drain()

    async def _finish(self) -> None:
        draining = self.state is _DRAINING
        groups.leave_all(self)
        if self._mailbox_send is not None:
            self._mailbox_send.close()
        if self._mailbox_receive is not None:
            self._mailbox_receive.close()
        if self._room is not None:  # senders waiting for room find the connection closed
            self._room.set()
            self._room = None
        self.state = _DONE
        self._steady_ok = False
        self._driver.cancel_timer()
        self._timers.clear()
        try:
            # The driver owns the socket's end: the slot goes back once the socket is closed.
            self._socket_closed = True
            closed_now = getattr(self._driver, "closed_now", None)
            done = closed_now is not None and closed_now()
            if done and (self._told_close or not self._opened):
                # The common end (the socket closed already, the handler told): nothing to wait for,
                # so no shielded cancel scope (about 15 Python calls fewer per connection).
                return
            with anyio.CancelScope(shield=True):
                if not done:
                    await self._driver.closed()
                if self._opened and not self._told_close:
                    if self._aborted is not None:
                        notice = self._aborted
                    elif draining:
                        notice = ConnectionClose(1001, "server shutting down")
                    else:
                        notice = ConnectionClose(1006, "connection lost")
                    with cleanup_scope():
                        await _run_async(self._deliver_steps(notice))
        finally:
            self._driver = _ENDED  # no cycle left through the driver (see `_Ended`)
            self._writer = NOWHERE
            observer = self._observer
            if observer is not None:
                self._observer = None
                observer.ended(self)
            if self._release is not None:
                release, self._release = self._release, None
                release()
            if self._debug:
                self.log.debug("done")


_OPCODES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}


def describe_output(data: bytes) -> str:
    """What the server wrote, for the frame log: an HTTP response's first line, or its frames."""
    if data.startswith(b"HTTP/"):
        return repr(data.split(b"\r\n", 1)[0].decode("latin-1"))
    parts: list[str] = []
    position = 0
    while position + 2 <= len(data) and len(parts) < 20:
        first, size, header = data[position], data[position + 1] & 0x7F, 2
        if size == 126:
            size, header = int.from_bytes(data[position + 2 : position + 4], "big"), 4
        elif size == 127:
            size, header = int.from_bytes(data[position + 2 : position + 10], "big"), 10
        payload = data[position + header : position + header + size]
        name = _OPCODES.get(first & 0x0F, f"opcode {first & 0x0F}")
        shown = f" {payload[:60]!r}" if name in ("text", "close", "ping", "pong") else ""
        parts.append(f"{name}({size}){shown}{'' if first & 0x80 else ' (fragment)'}")
        position += header + size
    if position < len(data):
        parts.append(f"... {len(data) - position} more bytes")
    return ", ".join(parts)
