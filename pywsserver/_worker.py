"""The worker: one per connection; it does all the I/O and runs the current protocol module.

Theory of operation
-------------------
A worker is a temporary child of the worker supervisor. It owns the
connection's stream, its mailbox of actions (from ``send``/``ping``/``close``
callers) and the current protocol module. Its life, every transition here:

==============  ===================================================  ============
state           event                                                next state
==============  ===================================================  ============
HANDSHAKING     the module switches to a non-handshake module        SERVING
HANDSHAKING     the module stops (refused, timed out, peer left)     DONE
SERVING         the module stops (closing handshake done, EOF)       DONE
HANDSHAKING,    the server stops (cancellation): ``GoingAway`` to    DRAINING
SERVING         the module, then keep reading until its deadline
DRAINING        the module stops, the socket closes or the deadline  DONE
==============  ===================================================  ============

Two tasks, both owned by the worker's task group: the *reader* receives
bytes, runs module timers and calls the handler (so handler calls are never
concurrent and need no lock); the *mailbox* task turns actions into frames.
Writes from both go through one lock. Effects returned by the module are
carried out in order by `Worker._apply`; a `Deliver` calls the
handler and feeds the outcome back to the module, whose new effects run next.

Whatever ends the worker, the handler's ``connection_close`` runs exactly once
if ``init`` succeeded, the socket is closed and the connection's slot is
released.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import logging
import socket
import ssl
import threading
import traceback
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.tls import TLSAttribute, TLSStream

from ._errors import ConnectionClosed
from ._handler import HandlerModule, call
from ._messages import (
    ConnectionClose,
    Handshake,
    Opened,
    Reject,
    normalize_decision,
    normalize_result,
    valid_close_code,
)
from ._options import WorkerOptions
from ._throttle import ThrottledReport
from .cluster._address import Address, address_of
from .protocols import (
    Action,
    CloseAction,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    Effect,
    GoingAway,
    PingAction,
    ProtocolModule,
    SendAction,
    SetTimer,
    Stop,
    Switch,
    TLSInfo,
    Write,
)
from .supervision import MailboxFull, cleanup_scope
from .supervision import _groups as groups

__all__ = ["Worker", "WorkerState", "close", "ping", "send"]

logger = logging.getLogger("pywsserver.worker")
#: Every frame written and message delivered, at DEBUG (checked once per connection: free when off).
frames_logger = logging.getLogger("pywsserver.frames")
#: Reports of clients that send bad input: at most one line per kind every 10 s (see ``_throttle``).
bad_input = ThrottledReport(logging.getLogger("pywsserver.bad_input"))
_connection_ids = itertools.count(1)
_CLOSED_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class WorkerState(enum.Enum):
    """Where a worker is in its life (see the table in the module docstring)."""

    HANDSHAKING = "handshaking"
    SERVING = "serving"
    DRAINING = "draining"
    DONE = "done"


class ConnectionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the connection id and peer, and adds them as attributes."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Add the connection's context to the record."""
        extra = self.extra or {}
        kwargs.setdefault("extra", {}).update(extra)
        return f"[conn {extra.get('connection_id')} {extra.get('peer')}] {msg}", kwargs


def _sockname(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except OSError:
        return None


def _address(raw: Any) -> tuple[str, int] | None:
    if isinstance(raw, tuple) and len(raw) >= 2:
        if len(raw) == 2 and type(raw[0]) is str and type(raw[1]) is int:
            return raw  # IPv4 as the socket gives it: no copy
        return (str(raw[0]), int(raw[1]))
    return None


class Worker:
    """The handle on one connection's worker.

    ``init`` receives it as ``options["worker"]``; keep it to talk to the
    connection later, from any task (``await worker.send(data)``) or from
    another thread (``worker.send_threadsafe(data)``). Once the connection
    is gone these raise `ConnectionClosed`.
    """

    # Slots: a connection's worker lives as long as the connection; no per-instance dict.
    __slots__ = (
        "__weakref__",
        "_aborted",
        "_backlog",
        "_busy",
        "_can_write",
        "_debug",
        "_eof_seen",
        "_frames_log",
        "_handler",
        "_handler_object",
        "_handler_state",
        "_log",
        "_log_context",
        "_loop",
        "_mailbox_receive",
        "_mailbox_send",
        "_module",
        "_module_config",
        "_opened",
        "_options",
        "_out",
        "_queue",
        "_reading_paused",
        "_release",
        "_serve_scope",
        "_sock",
        "_socket_closed",
        "_stopped",
        "_stream",
        "_timer_handle",
        "_timers",
        "_tls",
        "_tls_handshake_timeout",
        "_token",
        "_told_close",
        "_transport",
        "_wake",
        "_write_lock",
        "connection",
        "connection_id",
        "state",
    )

    def __init__(
        self,
        options: WorkerOptions,
        connection: anyio.abc.ByteStream | socket.socket,
        release: Callable[[], None] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = 10.0,
        token: anyio.lowlevel.EventLoopToken | None = None,
    ) -> None:
        self._options = options
        self._release = release
        self._tls = tls
        self._tls_handshake_timeout = tls_handshake_timeout
        self._transport: asyncio.Transport | None = None
        # Protocol mode's event loop, looked up once: asyncio.get_running_loop() makes a getpid()
        # system call each time (its check against a fork).
        self._loop: asyncio.AbstractEventLoop | None = None
        if isinstance(connection, socket.socket):
            # The asyncio fast path: the worker's own protocol reads into a reused buffer and
            # runs the module (and sync handlers) in its callbacks, with no task switch.
            self._sock: socket.socket | None = connection
            self._stream: anyio.abc.ByteStream | None = None
            loop = self._loop = asyncio.get_running_loop()
            if tls is None and isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
                # The default loop: the transport is made now, as asyncio's own servers make one
                # for each accepted socket (connect_accepted_socket would do the same, then make
                # the task wait a loop turn for connection_made, a wait that serves nothing here).
                # Its callbacks run once this task yields; the addresses it looked up are shared.
                make = loop._make_socket_transport  # type: ignore[attr-defined]
                self._transport = make(connection, _WorkerProtocol(self))
                peer_raw: Any = self._transport.get_extra_info("peername")
                local_raw: Any = self._transport.get_extra_info("sockname")
            else:
                peer_raw = _sockname(connection.getpeername)
                local_raw = _sockname(connection.getsockname)
        else:
            self._sock = None
            self._stream = connection
            peer_raw = connection.extra(anyio.abc.SocketAttribute.remote_address, None)
            local_raw = connection.extra(anyio.abc.SocketAttribute.local_address, None)
        # Effects still to carry out, as a stack: the next one is at the end (a list, not a deque:
        # an empty deque holds 760 bytes, and every connection has this queue for its whole life).
        self._queue: list[Effect] = []
        self._out: list[bytes] = []
        self._backlog: deque[Any] | None = None  # made when input must wait
        self._busy = False
        self._reading_paused = False
        self._eof_seen = False
        # Protocol mode: one event-loop timer per connection, at the earliest deadline in ``_timers``.
        self._timer_handle: asyncio.TimerHandle | None = None
        self._wake: _Wakeup | None = None
        self._can_write = False  # protocol mode: the transport takes more (its buffer is below the bound)
        # The mailbox is made when an action first has to wait (protocol mode) or at once (stream mode).
        self._mailbox_send: MemoryObjectSendStream[Action] | None = None
        self._mailbox_receive: MemoryObjectReceiveStream[Action] | None = None
        self._write_lock = anyio.Lock(fast_acquire=True) if self._stream is not None else None
        self._timers: dict[str, float] = {}
        self._socket_closed = False
        self._stopped = False
        self._handler: HandlerModule | None = None
        self._handler_object: Any = None
        self._handler_state: Any = None
        self._opened = False
        self._told_close = False
        # For the thread-safe calls; the server passes its own (all its workers share the event loop).
        self._token = token
        self._serve_scope: anyio.CancelScope | None = None
        self._aborted: ConnectionClose | None = None
        #: Where the worker is in its life.
        self.state = WorkerState.HANDSHAKING
        if self._stream is not None:  # stream mode: the mailbox task reads it from the start
            self._mailbox()
        #: Unique within the process; appears in every log line of the connection.
        self.connection_id = next(_connection_ids)
        self.connection = ConnectionInfo(
            peer=_address(peer_raw), local=_address(local_raw), connection_id=self.connection_id
        )
        # Log levels are looked at once per connection: a debug line that is off costs one test.
        self._debug = logger.isEnabledFor(logging.DEBUG)
        self._log: ConnectionLogger | None = None  # made at the first line logged
        self._log_context: dict[str, Any] | None = None
        # The connection logs its traffic if ``pywsserver.frames`` is at DEBUG when it is accepted.
        self._frames_log: ConnectionLogger | None = None
        if frames_logger.isEnabledFor(logging.DEBUG):
            self._frames_log = ConnectionLogger(frames_logger, self._context())
        initial = options.modules[options.initial_module]
        self._module_config = initial
        try:
            self._module: ProtocolModule = initial.module(initial.options, self.connection)
        except BaseException:
            if self._transport is not None:  # made above: it would keep the socket registered
                self._transport.abort()
            raise

    def __repr__(self) -> str:
        return f"<Worker {self.connection_id} {self.peer} {self.state.value}>"

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

    # ------------------------------------------------------------ public API

    @property
    def peer(self) -> tuple[str, int] | None:
        """The peer's ``(host, port)``."""
        return self.connection.peer

    @property
    def alive(self) -> bool:
        """Whether the connection is still up (sending may still fail once closing has begun)."""
        return not self._stopped and not self._socket_closed and self._aborted is None

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
        """Like `send` but never waits: raises `MailboxFull` when the mailbox is full."""
        if not isinstance(data, str | bytes):
            raise TypeError(f"send_nowait() takes str or bytes, got {type(data).__name__}")
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
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

    def _offer(self, action: Action) -> bool:
        """Queue ``action`` without waiting; ``False`` when the mailbox is full."""
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        if self._act_now(action):
            return True
        try:
            self._mailbox()[0].send_nowait(action)
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None
        self._wake_task()
        return True

    def _act_now(self, action: Action) -> bool:
        """Protocol mode: carry ``action`` out at once when nothing is queued before it and the peer reads.

        This keeps the order of the mailbox (it must be empty) and its bound
        (a peer that does not read makes actions queue), without a task switch.
        """
        if not self._writable_now():
            return False
        self._act(action)
        return True

    def _writable_now(self) -> bool:
        """Protocol mode: the transport takes more and no action waits in the mailbox before new output."""
        mailbox = self._mailbox_send
        return (
            self._transport is not None
            and self._can_write
            and not (mailbox is not None and mailbox.statistics().current_buffer_used)
        )

    def _broadcast_now(self, frame: bytes) -> bool:
        """Protocol mode: write a broadcast's ready-made frame now, if nothing must come before it.

        ``False`` when the frame cannot go out as is (stream mode, a full outgoing buffer, actions
        waiting in the mailbox, a module that encodes per connection): then the caller queues it.
        """
        loop = self._loop
        if loop is None or self._socket_closed or self._stopped or not self._writable_now():
            return False
        raw_frames_ok = getattr(self._module, "raw_frames_ok", None)
        if raw_frames_ok is None or not raw_frames_ok():
            return False
        out = self._out
        out.append(frame)  # after any reply this connection has produced but not yet written
        if len(out) == 1:
            # Written at the end of this loop turn, with the other broadcasts' frames of the same
            # turn for this connection: one system call for a burst of broadcasts, not one each.
            _flush_soon(self, loop)
        return True

    def _mailbox(self) -> tuple[MemoryObjectSendStream[Action], MemoryObjectReceiveStream[Action]]:
        """The mailbox, made on first use (most connections never need one)."""
        if self._mailbox_send is None or self._mailbox_receive is None:
            if self.state is WorkerState.DONE:
                raise ConnectionClosed(f"{self!r} is closed")
            self._mailbox_send, self._mailbox_receive = anyio.create_memory_object_stream[Action](
                self._options.mailbox_size
            )
        return self._mailbox_send, self._mailbox_receive

    def _abort(self, code: int, reason: str) -> None:
        """Drop the connection now, without a closing handshake; the handler is told ``code``."""
        if not self.alive:
            return
        self._aborted = ConnectionClose(code, reason)
        self.log.warning("closing the connection: %s", reason)
        if self._sock is not None:
            # Protocol mode: drop the transport now; the worker's task sees it stopped and ends
            # (after an async handler call in progress returns), then tells the handler.
            self._stopped = True
            if self._transport is not None and not self._socket_closed:
                self._socket_closed = True
                self._transport.abort()
            self._wake_task()
        elif self._serve_scope is not None:
            self._serve_scope.cancel()

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
        try:
            anyio.from_thread.run(function, *args, token=self._token)
        except RuntimeError as error:  # the event loop has gone
            raise ConnectionClosed(f"{self!r} is closed: {error}") from None

    async def _put(self, action: Action) -> None:
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        if self._act_now(action):
            await anyio.lowlevel.checkpoint()
            return
        mailbox = self._mailbox()[0]
        try:
            mailbox.send_nowait(action)
        except anyio.WouldBlock:
            self._wake_task()
            try:
                await mailbox.send(action)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                raise ConnectionClosed(f"{self!r} is closed") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None
        else:
            await anyio.lowlevel.checkpoint()
        self._wake_task()

    # --------------------------------------------------------------- running

    async def run(self, *, task_status: anyio.abc.TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; the worker supervisor's start function calls it."""
        if self._token is None:
            self._token = anyio.lowlevel.current_token()
        task_status.started(self)
        if self._debug:
            self.log.debug("accepted")
        try:
            if self._sock is not None:
                # Protocol mode (asyncio), in this frame: an idle connection's task holds as few
                # frames as can be. One task: callbacks do the reading, this task the async handler
                # calls and the mailbox. No cancel scope of its own (one is 1.7 KiB): `_abort`
                # stops it by flag and wake-up.
                self._busy = True  # bytes arriving before the module has started wait in the backlog
                if await self._open_protocol():
                    self._busy = False
                    self._feed(self._module.start(b"", {}))
                    await self._continue()
            else:
                await self._serve()
        finally:
            if not (self._stopped or self._socket_closed or self._aborted is not None):
                with cleanup_scope():  # made only when there is something to drain (a timer each)
                    await self._drain()
            await self._finish()

    async def _serve(self) -> None:
        """Stream mode (any backend): a reader loop and a mailbox task."""
        if self._tls is not None and not await self._start_tls_stream():
            return
        async with anyio.create_task_group() as tg:
            self._serve_scope = tg.cancel_scope
            tg.start_soon(self._mailbox_loop)
            await self._apply(self._module.start(b"", {}))
            await self._reader_loop()
            tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        """Cancelled while the connection is up: say going away and wait for the peer's close."""
        if self._stopped or self._socket_closed or self._aborted is not None:
            return
        self.state = WorkerState.DRAINING
        if self._debug:
            self.log.debug("draining")
        if self._sock is not None:
            self._busy = False  # a handler call in progress was cancelled with the worker
            self._queue.clear()
            self._feed(self._module.action(GoingAway()))
            self._resume_reading()
            await self._continue()
        else:
            await self._apply(self._module.action(GoingAway()))
            await self._reader_loop()

    async def _finish(self) -> None:
        draining = self.state is WorkerState.DRAINING
        groups.leave_all(self)
        if self._mailbox_send is not None:
            self._mailbox_send.close()
        if self._mailbox_receive is not None:
            self._mailbox_receive.close()
        self.state = WorkerState.DONE
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        self._timers.clear()
        try:
            if self._socket_closed and not (self._opened and not self._told_close):
                return  # the common end: nothing left to await, no cancel scope needed
            with anyio.CancelScope(shield=True):
                if not self._socket_closed:
                    self._socket_closed = True
                    if self._transport is not None:
                        self._transport.abort()
                    elif self._sock is not None:
                        self._sock.close()
                    elif self._stream is not None:
                        with anyio.move_on_after(1):
                            await self._stream.aclose()
                if self._opened and not self._told_close:
                    if self._aborted is not None:
                        notice = self._aborted
                    elif draining:
                        notice = ConnectionClose(1001, "server shutting down")
                    else:
                        notice = ConnectionClose(1006, "connection lost")
                    with cleanup_scope():
                        await self._notify_closed(notice)
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()
            if self._debug:
                self.log.debug("done")

    # ------------------------------------------------- stream I/O (any backend)

    async def _reader_loop(self) -> None:
        stream = self._stream
        assert stream is not None
        while not self._stopped and not self._socket_closed:
            if self._timers:
                deadline = min(self._timers.values())
                with anyio.CancelScope(deadline=deadline) as scope:
                    try:
                        data = await stream.receive()
                    except _CLOSED_ERRORS:
                        await self._apply(self._module.eof_received())
                        return
                if scope.cancelled_caught:
                    await self._expire_timers()
                    continue
            else:
                try:
                    data = await stream.receive()
                except _CLOSED_ERRORS:
                    await self._apply(self._module.eof_received())
                    return
            if self._frames_log is not None:
                self._frames_log.debug("received %d bytes", len(data))
            await self._apply(self._module.data_received(data))

    # ------------------------------------------------ protocol I/O (asyncio)

    async def _open_protocol(self) -> bool:
        """Wrap the socket in the worker's protocol (after the TLS handshake, for ``wss``); ``False`` if it failed."""
        assert self._sock is not None
        loop = self._loop
        assert loop is not None
        self._wake = _Wakeup(loop)
        self._can_write = True
        if self._tls is None:
            if self._transport is None:  # else made with the worker (the default loop)
                await loop.connect_accepted_socket(lambda: _WorkerProtocol(self), self._sock)
            return True
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: _WorkerProtocol(self),
                self._sock,
                ssl=self._tls,
                ssl_handshake_timeout=self._tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError) as error:
            self._tls_failed(error)
            return False
        self._connection_secured(transport.get_extra_info("ssl_object"))
        return True

    async def _start_tls_stream(self) -> bool:
        """Stream mode: the TLS handshake, bounded by ``tls_handshake_timeout``; ``False`` if it failed."""
        assert self._stream is not None
        assert self._tls is not None
        try:
            with anyio.fail_after(self._tls_handshake_timeout):
                self._stream = await TLSStream.wrap(
                    self._stream, server_side=True, ssl_context=self._tls, standard_compatible=False
                )
        except (OSError, ssl.SSLError, TimeoutError, anyio.BrokenResourceError, anyio.EndOfStream) as error:
            await anyio.aclose_forcefully(self._stream)
            self._tls_failed(error)
            return False
        self._connection_secured(self._stream.extra(TLSAttribute.ssl_object))
        return True

    def _tls_failed(self, error: BaseException) -> None:
        # Scanners and stalled clients fail here all the time: not worth more than a debug line.
        self.log.debug("TLS handshake failed: %r", error)
        bad_input("failed TLS handshakes", f"{self._peer_text}: {error!r}", self._context())
        self._socket_closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._sock is not None:
            self._sock.close()
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
        self._module = self._module_config.module(self._module_config.options, self.connection)

    def _feed(self, effects: list[Effect]) -> None:
        """Queue effects and carry out all that need no task; a call to an async handler wakes the task."""
        if effects:
            self._queue[0:0] = effects[::-1]  # after whatever is still pending
        self._run_queue()
        self._flush()

    def _flush(self) -> None:
        """Write what the effects produced in one call: one system call for a batch of replies."""
        out = self._out
        if out:
            data = _joined(out)
            if self._frames_log is not None:
                self._frames_log.debug("sent %s", describe_output(data))
            if not self._socket_closed and self._transport is not None:
                self._transport.write(data)

    def _run_queue(self) -> None:
        queue = self._queue
        while queue and not self._busy and not self._stopped:
            effect = queue.pop()
            if type(effect) is Deliver:
                if self._needs_task(effect.message):
                    queue.append(effect)
                    self._busy = True
                    self._pause_reading()
                    self._wake_task()
                    return
                queue.extend(reversed(_run_sync(self._deliver_steps(effect.message))))
            else:
                more = self._execute(effect)
                if more:
                    queue.extend(reversed(more))

    def _execute(self, effect: Effect) -> list[Effect] | None:
        """Carry out one effect other than Deliver, synchronously (protocol mode)."""
        kind = type(effect)
        if kind is Write:
            if not self._socket_closed:
                self._out.append(effect.data)  # type: ignore[union-attr]  # written together by _flush
        elif kind is SetTimer:
            self._set_timer(effect.name, effect.seconds)  # type: ignore[union-attr]
        elif kind is CloseSocket:
            if not self._socket_closed:
                self._flush()
                self._socket_closed = True
                if self._transport is not None:
                    self._transport.close()
        elif kind is Stop:
            self._flush()
            self._stopped = True
            self._queue.clear()
            self._stopping(effect)  # type: ignore[arg-type]
            self._wake_task()
        elif kind is Switch:
            return self._switch(effect)  # type: ignore[arg-type]
        else:
            raise TypeError(f"{type(self._module).__name__} returned an unknown effect {effect!r}")
        return None

    def _stopping(self, stop: Stop) -> None:
        if self._debug:
            self.log.debug("stopping: %s", stop.reason)
        if stop.bad_input:
            bad_input("bad handshakes", f"{self._peer_text}: {stop.reason}", self._context())

    @property
    def _peer_text(self) -> str:
        peer = self.connection.peer
        return f"{peer[0]}:{peer[1]}" if peer else "unix socket"

    def _wake_task(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _continue(self) -> None:
        """The worker task's part in protocol mode: async handler calls and leftover input."""
        wake = self._wake
        assert wake is not None
        while not self._stopped and not (self._socket_closed and not self._busy and not self._backlog):
            self._take_mailbox()
            if self._busy:
                effect = self._queue.pop()
                assert type(effect) is Deliver
                more = await _run_async(self._deliver_steps(effect.message))
                self._busy = False
                self._queue.extend(reversed(more))
                self._run_queue()
                self._flush()
                self._resume_reading()
            if self._backlog and not self._busy:
                self._take_backlog()
                continue
            if not self._busy:
                wake.clear()
                if self._stopped or self._socket_closed:
                    break
                await wake.future()

    def _take_mailbox(self) -> None:
        """Carry out queued actions while the peer reads (protocol mode has no mailbox task)."""
        mailbox = self._mailbox_receive
        while mailbox is not None and not self._stopped and self._can_write:
            try:
                action = mailbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            self._act(action)

    def _act(self, action: Action) -> None:
        """Carry out an action's effects at once (protocol mode); actions never call the handler."""
        for effect in self._module.action(action):
            if type(effect) is Deliver:
                raise RuntimeError(f"{type(self._module).__name__}.action() returned Deliver, which it may not")
            self._feed_one(effect)

    def _take_backlog(self) -> None:
        backlog = self._backlog
        if backlog is None:
            return
        while backlog and not self._busy and not self._stopped:
            self._dispatch(*backlog.popleft())
        if not backlog:
            self._resume_reading()

    def _input(self, kind: str, value: Any) -> None:
        """Input from the protocol or a timer: handled now, or queued while the task is busy."""
        if self._stopped:
            return
        if self._busy or self._backlog:
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.append((kind, value))
            self._pause_reading()
            self._wake_task()
            return
        self._dispatch(kind, value)

    def _dispatch(self, kind: str, value: Any) -> None:
        if self._frames_log is not None:
            self._frames_log.debug(
                "received %d bytes" if kind == "data" else "%s", len(value) if kind == "data" else kind
            )
        if kind == "data":
            self._feed(self._module.data_received(value))
        elif kind == "eof":
            self._feed(self._module.eof_received())
        else:
            self._feed(self._module.timer_expired(value))

    def _set_timer(self, name: str, seconds: float | None) -> None:
        """Protocol mode: (re)start or stop a timer; only an earlier deadline costs a new event-loop handle.

        The connection's timers are deadlines in ``_timers`` under one
        event-loop handle, due at the earliest of them or before. Stopping a
        timer, or moving it later (``idle_timeout`` does on every read), only
        changes its deadline; a handle that fires early finds nothing due and
        sleeps again until the next deadline.
        """
        if seconds is None:
            self._timers.pop(name, None)
            return
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + seconds
        self._timers[name] = deadline
        handle = self._timer_handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timer_handle = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        timers = self._timers
        if not timers:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time() + 0.001
        for deadline, name in sorted((deadline, name) for name, deadline in timers.items() if deadline <= now):
            if timers.get(name) == deadline and not self._stopped:  # not moved or stopped by an earlier one
                del timers[name]
                self._input("timer", name)
        if timers and self._timer_handle is None and self.state is not WorkerState.DONE:
            self._timer_handle = loop.call_at(min(timers.values()), self._on_timer)

    def _on_eof(self) -> None:
        if not self._eof_seen:
            self._eof_seen = True
            self._input("eof", None)

    def _on_lost(self) -> None:
        self._socket_closed = True
        self._on_eof()
        self._wake_task()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._socket_closed:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._busy
            and not self._backlog
            and self._can_write
            and self._transport is not None
            and not self._socket_closed
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    async def _expire_timers(self) -> None:
        now = anyio.current_time()
        for name, deadline in list(self._timers.items()):
            if deadline <= now and self._timers.get(name) == deadline:
                del self._timers[name]
                await self._apply(self._module.timer_expired(name))

    async def _mailbox_loop(self) -> None:
        assert self._mailbox_receive is not None
        async for action in self._mailbox_receive:
            await self._apply(self._module.action(action), from_mailbox=True)
            if self._stopped:
                return

    def _feed_one(self, effect: Effect) -> None:
        more = self._execute(effect)
        if more:
            self._feed(more)
        self._flush()

    # --------------------------------------------------------------- effects

    async def _apply(self, effects: list[Effect], from_mailbox: bool = False) -> None:
        """Stream mode: carry out effects in order. Writes are gathered and sent together before the
        next thing that awaits (a call to an async handler, a close) and at the end, so the replies a
        sync handler gives to the messages of one read go out in one send."""
        queue = deque(effects)
        out: list[bytes] = []
        while queue:
            effect = queue.popleft()
            kind = type(effect)
            if kind is Write:
                out.append(effect.data)  # type: ignore[union-attr]
            elif kind is Deliver:
                if from_mailbox:
                    raise RuntimeError(f"{type(self._module).__name__}.action() returned Deliver, which it may not")
                message = effect.message  # type: ignore[union-attr]
                if self._needs_task(message):
                    await self._write_all(out)
                    more = await _run_async(self._deliver_steps(message))
                else:
                    more = _run_sync(self._deliver_steps(message))
                queue.extendleft(reversed(more))
            elif kind is SetTimer:
                seconds = effect.seconds  # type: ignore[union-attr]
                if seconds is None:
                    self._timers.pop(effect.name, None)  # type: ignore[union-attr]
                else:
                    self._timers[effect.name] = anyio.current_time() + seconds  # type: ignore[union-attr]
            elif kind is CloseSocket:
                await self._write_all(out)
                await self._close_socket()
            elif kind is Stop:
                await self._write_all(out)
                self._stopped = True
                self._stopping(effect)  # type: ignore[arg-type]
                return
            elif kind is Switch:
                queue.extendleft(reversed(self._switch(effect)))  # type: ignore[arg-type]
            else:
                raise TypeError(f"{type(self._module).__name__} returned an unknown effect {effect!r}")
        await self._write_all(out)

    async def _write_all(self, out: list[bytes]) -> None:
        if out:
            await self._write(_joined(out))

    def _switch(self, switch: Switch) -> list[Effect]:
        config = self._options.modules.get(switch.module)
        if config is None:
            raise RuntimeError(f"{type(self._module).__name__} switched to unknown protocol module {switch.module!r}")
        self._timers.clear()  # the handle stays; it finds nothing due
        self._module_config = config
        self._module = config.module(config.options, self.connection)
        if not getattr(config.module, "handshake", False) and self.state is WorkerState.HANDSHAKING:
            self.state = WorkerState.SERVING
        if self._debug:
            self.log.debug("switched to %s", config.name)
        return self._module.start(switch.data, switch.context)

    async def _write(self, data: bytes) -> None:
        if self._socket_closed or self._stream is None:
            return
        assert self._write_lock is not None
        if self._frames_log is not None:
            self._frames_log.debug("sent %s", describe_output(data))
        try:
            async with self._write_lock:
                await self._stream.send(data)
        except _CLOSED_ERRORS:
            self._socket_closed = True

    async def _close_socket(self) -> None:
        if self._socket_closed or self._stream is None:
            return
        self._socket_closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._stream.aclose()

    # --------------------------------------------------------------- handler

    def _needs_task(self, message: Any) -> bool:
        """Whether delivering ``message`` calls an ``async`` callback (so a task must run it)."""
        if isinstance(message, Opened):
            handler = message.handler or self._module_config.handler
            return handler is not None and handler.async_init
        if isinstance(message, Handshake):
            return bool(message.handler.async_handshake)
        if self._handler is None or not self._opened:
            return False
        if isinstance(message, ConnectionClose) and self._told_close:
            return False
        return self._handler.async_handle

    def _deliver_steps(self, message: Any) -> Steps:
        """Deliver ``message`` to the handler: yields each call to make, returns the module's next effects.

        Written once, run synchronously in protocol callbacks (sync handlers) or
        awaited by a task (async handlers, and every handler in stream mode).
        """
        module = self._module
        if isinstance(message, Handshake):
            return (yield from self._handshake_steps(message))
        if isinstance(message, Opened):
            handler = message.handler or self._module_config.handler
            if handler is None:
                return module.handler_failed(RuntimeError("no handler_module configured"))
            if message.handler is not None:
                options: dict[str, Any] = dict(message.info)
            else:
                options = dict(getattr(self._module_config.options, "handler_options", None) or {})
                options.update(message.info)
            options["worker"] = self
            try:
                if self._handler is not handler or self._handler_object is None:
                    self._handler_object = handler.for_connection()
                self._handler = handler
                self._handler_state = yield (self._handler_object.init, (options,))
            except Exception as error:
                self._report("raised in init", error)
                return module.handler_failed(error)
            self._opened = True
            if self._debug:
                self.log.debug("established")
            return module.handler_returned(None)
        if isinstance(message, ConnectionClose):
            if message.code in (1002, 1007, 1009):
                bad_input(
                    "protocol violations", f"{self._peer_text}: closed {message.code} {message.reason}", self._context()
                )
            groups.leave_all(self)  # a closed connection is no longer reachable through its groups
            if self._opened and not self._told_close:
                self._told_close = True
                try:
                    yield (self._handler_object.handle, (message, self._handler_state))
                except Exception as error:
                    self._report("raised in handle(connection_close)", error)
            return module.handler_returned(None)
        if not self._opened:
            return module.handler_failed(RuntimeError("message before init"))
        if self._frames_log is not None:
            self._frames_log.debug("handle(%.200r)", message)
        try:
            raw = yield (self._handler_object.handle, (message, self._handler_state))
        except Exception as error:
            self._report(f"raised in handle({message!r:.80})", error)
            return module.handler_failed(error)
        try:
            result = normalize_result(raw)
        except TypeError as error:
            self.log.error("handler %s returned an invalid result: %s", self._handler_name, error)
            return module.handler_failed(error)
        self._handler_state = result.state
        return module.handler_returned(result)

    def _handshake_steps(self, message: Handshake) -> Steps:
        """Run the handler's ``handshake`` hook; the module gets an `Accept` or a `Reject`."""
        module = self._module
        handler = message.handler
        self._handler = handler
        info = dict(message.info)
        info["worker"] = self
        try:
            self._handler_object = handler.for_connection()  # the same object then serves the connection
            raw = yield (self._handler_object.handshake, (info,))
        except Exception as error:
            self._report("raised in handshake", error)
            return module.handler_failed(error)
        try:
            decision = normalize_decision(raw)
        except TypeError as error:
            self.log.error("handler %s returned an invalid handshake decision: %s", self._handler_name, error)
            return module.handler_failed(error)
        if isinstance(decision, Reject):
            self.log.debug("handshake rejected by %s with %d", self._handler_name, decision.status)
        return module.handler_returned(decision)

    @property
    def _handler_name(self) -> str:
        return self._handler.name if self._handler is not None else "?"

    async def _notify_closed(self, message: ConnectionClose) -> None:
        await _run_async(self._deliver_steps(message))

    def _report(self, what: str, error: BaseException) -> None:
        # Text only: a log record kept by a handler must not keep the traceback's frames (and this worker).
        self.log.error(
            "handler %s %s: %s\n%s",
            self._handler_name,
            what,
            repr(error),
            "".join(traceback.format_exception(error)).rstrip(),
        )


def _joined(out: list[bytes]) -> bytes:
    """The data gathered in ``out`` as one write (no copy for a single piece); ``out`` is emptied."""
    data = out[0] if len(out) == 1 else b"".join(out)
    out.clear()
    return data


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


Steps = Generator[tuple[Callable[..., Any], tuple[Any, ...]], Any, list[Effect]]


_NEVER_AWAITABLE = frozenset((tuple, type(None), str, bytes, int, dict, list))


def _run_sync(steps: Steps) -> list[Effect]:
    """Run handler steps whose callbacks are plain functions."""
    try:
        function, args = next(steps)
        while True:
            try:
                result = function(*args)
                # What handlers return most (tuples, None) is never awaitable: no ABC check for it.
                if type(result) not in _NEVER_AWAITABLE and inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    raise TypeError(f"{function!r} returned an awaitable; declare it 'async def'")
            except Exception as error:
                function, args = steps.throw(error)
            else:
                function, args = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _run_async(steps: Steps) -> list[Effect]:
    """Run handler steps, awaiting callbacks that are ``async``."""
    try:
        function, args = next(steps)
        while True:
            try:
                result = await call(function, *args)
            except Exception as error:
                function, args = steps.throw(error)
            else:
                function, args = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class _Wakeup:
    """What the worker's task sleeps on: a flag and, while someone waits, one future (no deque)."""

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
_flushes = threading.local()


def _flush_soon(worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
    """Have ``worker`` write its outgoing frames at the end of this event-loop turn."""
    pending: list[Worker] | None = getattr(_flushes, "pending", None)
    if pending is None:
        pending = _flushes.pending = []
        loop.call_soon(_flush_pending)
    pending.append(worker)


def _flush_pending() -> None:
    pending: list[Worker] = _flushes.pending
    _flushes.pending = None
    for worker in pending:
        try:
            worker._flush()
        except Exception:  # one broken transport must not keep the others' frames back
            worker.log.exception("writing broadcast frames failed")


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


class _WorkerProtocol(asyncio.BufferedProtocol):
    """Reads into the shared buffer and hands a copy of the bytes to the worker."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._view = _read_buffer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self._worker
        worker._transport = transport  # type: ignore[assignment]
        limit = worker._options.write_buffer_size
        transport.set_write_buffer_limits(high=limit, low=limit // 4)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._worker._input("data", bytes(self._view[:nbytes]))

    def eof_received(self) -> bool:
        self._worker._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._on_lost()

    def pause_writing(self) -> None:
        self._worker._can_write = False
        self._worker._pause_reading()

    def resume_writing(self) -> None:
        self._worker._can_write = True
        self._worker._resume_reading()
        self._worker._wake_task()  # queued actions can be written again


async def send(worker: Worker, data: str | bytes) -> None:
    """Send ``data`` on ``worker``'s connection (see `Worker.send`)."""
    await worker.send(data)


async def ping(worker: Worker, data: bytes = b"") -> None:
    """Ping ``worker``'s peer (see `Worker.ping`)."""
    await worker.ping(data)


async def close(worker: Worker, code: int = 1000, reason: str = "") -> None:
    """Close ``worker``'s connection (see `Worker.close`)."""
    await worker.close(code, reason)
