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
carried out in order by :meth:`Worker._apply`; a :class:`Deliver` calls the
handler and feeds the outcome back to the module, whose new effects run next.

Whatever ends the worker, the handler's ``connection_close`` runs exactly once
if ``init`` succeeded, the socket is closed and the connection's slot is
released.
"""

from __future__ import annotations

import enum
import itertools
import logging
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel

from ._errors import ConnectionClosed
from ._handler import HandlerModule, call
from ._messages import ConnectionClose, Opened, normalize_result, valid_close_code
from ._options import WorkerOptions
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
    Write,
)
from .supervision import MailboxFull, cleanup_scope
from .supervision import _groups as groups

__all__ = ["Worker", "WorkerState", "close", "ping", "send"]

logger = logging.getLogger("pywsserver.worker")
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


def _address(raw: Any) -> tuple[str, int] | None:
    if isinstance(raw, tuple) and len(raw) >= 2:
        return (str(raw[0]), int(raw[1]))
    return None


class Worker:
    """The handle on one connection's worker.

    ``init`` receives it as ``options["worker"]``; keep it to talk to the
    connection later, from any task (``await worker.send(data)``) or from
    another thread (``worker.send_threadsafe(data)``). Once the connection
    is gone these raise :class:`ConnectionClosed`.
    """

    def __init__(
        self,
        options: WorkerOptions,
        stream: anyio.abc.ByteStream,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._options = options
        self._stream = stream
        self._release = release
        self._mailbox_send, self._mailbox_receive = anyio.create_memory_object_stream[Action](options.mailbox_size)
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._timers: dict[str, float] = {}
        self._socket_closed = False
        self._stopped = False
        self._handler: HandlerModule | None = None
        self._handler_object: Any = None
        self._handler_state: Any = None
        self._opened = False
        self._told_close = False
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._serve_scope: anyio.CancelScope | None = None
        self._aborted: ConnectionClose | None = None
        #: Where the worker is in its life.
        self.state = WorkerState.HANDSHAKING
        #: Unique within the process; appears in every log line of the connection.
        self.connection_id = next(_connection_ids)
        self.connection = ConnectionInfo(
            peer=_address(stream.extra(anyio.abc.SocketAttribute.remote_address, None)),
            local=_address(stream.extra(anyio.abc.SocketAttribute.local_address, None)),
            connection_id=self.connection_id,
        )
        peer = self.connection.peer
        self.log = ConnectionLogger(
            logger, {"connection_id": self.connection_id, "peer": f"{peer[0]}:{peer[1]}" if peer else "?"}
        )
        initial = options.modules[options.initial_module]
        self._module_config = initial
        self._module: ProtocolModule = initial.module(initial.options, self.connection)

    def __repr__(self) -> str:
        return f"<Worker {self.connection_id} {self.peer} {self.state.value}>"

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

        Raises :class:`ConnectionClosed` when the connection is gone. A message
        queued while the connection is closing is dropped.
        """
        if not isinstance(data, str | bytes | bytearray | memoryview):
            raise TypeError(f"send() takes str or bytes, got {type(data).__name__}")
        await self._put(SendAction(data if isinstance(data, str | bytes) else bytes(data)))

    def send_nowait(self, data: str | bytes) -> None:
        """Like :meth:`send` but never waits: raises :class:`MailboxFull` when the mailbox is full."""
        if not isinstance(data, str | bytes):
            raise TypeError(f"send_nowait() takes str or bytes, got {type(data).__name__}")
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        try:
            self._mailbox_send.send_nowait(SendAction(data))
        except anyio.WouldBlock:
            raise MailboxFull(f"the mailbox of {self!r} is full") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None

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

    def join(self, group: str) -> None:
        """Join a process group (see :mod:`pywsserver.groups`); left automatically when the connection ends."""
        groups.join(group, self)

    def leave(self, group: str) -> None:
        """Leave a process group."""
        groups.leave(group, self)

    def _offer(self, action: Action) -> bool:
        """Queue ``action`` without waiting; ``False`` when the mailbox is full."""
        if not self.alive:
            raise ConnectionClosed(f"{self!r} is closed")
        try:
            self._mailbox_send.send_nowait(action)
        except anyio.WouldBlock:
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None
        return True

    def _abort(self, code: int, reason: str) -> None:
        """Drop the connection now, without a closing handshake; the handler is told ``code``."""
        if not self.alive:
            return
        self._aborted = ConnectionClose(code, reason)
        self.log.warning("closing the connection: %s", reason)
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    def send_threadsafe(self, data: str | bytes) -> None:
        """:meth:`send` from another thread (blocks that thread until queued)."""
        self._from_thread(self.send, data)

    def ping_threadsafe(self, data: bytes = b"") -> None:
        """:meth:`ping` from another thread."""
        self._from_thread(self.ping, data)

    def close_threadsafe(self, code: int = 1000, reason: str = "") -> None:
        """:meth:`close` from another thread."""
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
        try:
            await self._mailbox_send.send(action)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ConnectionClosed(f"{self!r} is closed") from None

    # --------------------------------------------------------------- running

    async def run(self, *, task_status: anyio.abc.TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; the worker supervisor's start function calls it."""
        self._token = anyio.lowlevel.current_token()
        task_status.started(self)
        self.log.debug("accepted")
        try:
            await self._serve()
        finally:
            with cleanup_scope():
                await self._drain()
            await self._finish()

    async def _serve(self) -> None:
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
        self.log.debug("draining")
        await self._apply(self._module.action(GoingAway()))
        await self._reader_loop()

    async def _finish(self) -> None:
        draining = self.state is WorkerState.DRAINING
        groups.leave_all(self)
        self._mailbox_send.close()
        self._mailbox_receive.close()
        self.state = WorkerState.DONE
        try:
            with anyio.CancelScope(shield=True):
                if not self._socket_closed:
                    self._socket_closed = True
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
            self.log.debug("done")

    async def _reader_loop(self) -> None:
        stream = self._stream
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
            await self._apply(self._module.data_received(data))

    async def _expire_timers(self) -> None:
        now = anyio.current_time()
        for name, deadline in list(self._timers.items()):
            if deadline <= now and self._timers.get(name) == deadline:
                del self._timers[name]
                await self._apply(self._module.timer_expired(name))

    async def _mailbox_loop(self) -> None:
        async for action in self._mailbox_receive:
            await self._apply(self._module.action(action), from_mailbox=True)
            if self._stopped:
                return

    # --------------------------------------------------------------- effects

    async def _apply(self, effects: list[Effect], from_mailbox: bool = False) -> None:
        queue = deque(effects)
        while queue:
            effect = queue.popleft()
            kind = type(effect)
            if kind is Write:
                await self._write(effect.data)  # type: ignore[union-attr]
            elif kind is Deliver:
                if from_mailbox:
                    raise RuntimeError(f"{type(self._module).__name__}.action() returned Deliver, which it may not")
                more = await self._deliver(effect.message)  # type: ignore[union-attr]
                queue.extendleft(reversed(more))
            elif kind is SetTimer:
                seconds = effect.seconds  # type: ignore[union-attr]
                if seconds is None:
                    self._timers.pop(effect.name, None)  # type: ignore[union-attr]
                else:
                    self._timers[effect.name] = anyio.current_time() + seconds  # type: ignore[union-attr]
            elif kind is CloseSocket:
                await self._close_socket()
            elif kind is Stop:
                self._stopped = True
                self.log.debug("stopping: %s", effect.reason)  # type: ignore[union-attr]
                return
            elif kind is Switch:
                queue.extendleft(reversed(self._switch(effect)))  # type: ignore[arg-type]
            else:
                raise TypeError(f"{type(self._module).__name__} returned an unknown effect {effect!r}")

    def _switch(self, switch: Switch) -> list[Effect]:
        config = self._options.modules.get(switch.module)
        if config is None:
            raise RuntimeError(f"{type(self._module).__name__} switched to unknown protocol module {switch.module!r}")
        self._timers.clear()
        self._module_config = config
        self._module = config.module(config.options, self.connection)
        if not getattr(config.module, "handshake", False) and self.state is WorkerState.HANDSHAKING:
            self.state = WorkerState.SERVING
        self.log.debug("switched to %s", config.name)
        return self._module.start(switch.data, switch.context)

    async def _write(self, data: bytes) -> None:
        if self._socket_closed:
            return
        try:
            async with self._write_lock:
                await self._stream.send(data)
        except _CLOSED_ERRORS:
            self._socket_closed = True

    async def _close_socket(self) -> None:
        if self._socket_closed:
            return
        self._socket_closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self._stream.aclose()

    # --------------------------------------------------------------- handler

    async def _deliver(self, message: Any) -> list[Effect]:
        module = self._module
        if isinstance(message, Opened):
            return await self._open(message)
        if isinstance(message, ConnectionClose):
            await self._notify_closed(message)
            return module.handler_returned(None)
        if not self._opened:
            return module.handler_failed(RuntimeError("message before init"))
        try:
            raw = await call(self._handler_object.handle, message, self._handler_state)
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

    @property
    def _handler_name(self) -> str:
        return self._handler.name if self._handler is not None else "?"

    async def _open(self, message: Opened) -> list[Effect]:
        module = self._module
        handler = self._module_config.handler
        if handler is None:
            return module.handler_failed(RuntimeError("no handler_module configured"))
        self._handler = handler
        options: dict[str, Any] = dict(getattr(self._module_config.options, "handler_options", None) or {})
        options.update(message.info)
        options["worker"] = self
        try:
            self._handler_object = handler.for_connection()
            self._handler_state = await call(self._handler_object.init, options)
        except Exception as error:
            self._report("raised in init", error)
            return module.handler_failed(error)
        self._opened = True
        self.log.debug("established")
        return module.handler_returned(None)

    async def _notify_closed(self, message: ConnectionClose) -> None:
        groups.leave_all(self)  # a closed connection is no longer reachable through its groups
        if not self._opened or self._told_close:
            return
        self._told_close = True
        try:
            await call(self._handler_object.handle, message, self._handler_state)
        except Exception as error:
            self._report("raised in handle(connection_close)", error)

    def _report(self, what: str, error: BaseException) -> None:
        self.log.error(
            "handler %s %s: %r\n%s",
            self._handler_name,
            what,
            error,
            "".join(traceback.format_exception(error)).rstrip(),
        )


async def send(worker: Worker, data: str | bytes) -> None:
    """Send ``data`` on ``worker``'s connection (see :meth:`Worker.send`)."""
    await worker.send(data)


async def ping(worker: Worker, data: bytes = b"") -> None:
    """Ping ``worker``'s peer (see :meth:`Worker.ping`)."""
    await worker.ping(data)


async def close(worker: Worker, code: int = 1000, reason: str = "") -> None:
    """Close ``worker``'s connection (see :meth:`Worker.close`)."""
    await worker.close(code, reason)
