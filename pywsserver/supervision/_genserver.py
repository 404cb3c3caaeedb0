"""The gen-server-like process: one task, one bounded mailbox, one message at a time.

A `GenServer` subclass keeps its state on ``self`` and defines the
callbacks OTP's ``gen_server`` has: ``init``, ``handle_call``, ``handle_cast``,
``handle_info`` and ``terminate`` (each may be sync or ``async``). Its
`GenServer.run` is a child start function: it runs ``init``, reports a
`ServerRef` as ready, then serves the mailbox until stopped.

Guarantees, matching OTP where it matters:

* ``call`` waits for the reply at most ``timeout`` seconds (default 5),
  including the wait for room in the mailbox; a reply that comes later is
  dropped, never delivered to a stranger and never a crash of the server.
* ``cast`` and ``send`` never block: they put the message in the mailbox or
  raise `MailboxFull` at once.
* A caller whose request is pending when the server ends gets
  `NotRunning` naming the reason, not a hang.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Hashable
from typing import Any, ClassVar

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

from ._context import cleanup_scope
from ._errors import CallTimeout, MailboxFull, NotRunning
from ._groups import leave_all
from ._registry import register, resolve, unregister
from ._spec import ChildSpec, Restart, Shutdown, ShutdownValue

__all__ = ["NO_REPLY", "Caller", "GenServer", "ServerRef", "call", "cast", "send_info"]

logger = logging.getLogger("pywsserver.supervision")


class _NoReply:
    def __repr__(self) -> str:
        return "NO_REPLY"


NO_REPLY: Any = _NoReply()
"""Return it from ``handle_call`` to answer later with `Caller.reply`."""


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class Caller:
    """The waiting side of one call; ``handle_call`` gets it to answer later."""

    __slots__ = ("_error", "_event", "_pending", "_value", "abandoned", "answered")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._pending: set[Caller] | None = None
        #: The caller gave up waiting (timeout or cancellation); replies are dropped.
        self.abandoned = False
        #: A reply (or error) was already given.
        self.answered = False

    def reply(self, value: Any) -> None:
        """Answer the call. A second answer, or an answer after the caller gave up, is dropped."""
        if self.answered:
            return
        self.answered = True
        if self._pending is not None:
            self._pending.discard(self)
        self._value = value
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        if self.answered:
            return
        self.answered = True
        self._error = error
        self._event.set()


class _Call:
    __slots__ = ("caller", "request")

    def __init__(self, request: Any, caller: Caller) -> None:
        self.request = request
        self.caller = caller


class _Cast:
    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message


class _Info(_Cast):
    __slots__ = ()


class _StopMessage:
    __slots__ = ("reason",)

    def __init__(self, reason: BaseException | None) -> None:
        self.reason = reason


class ServerRef:
    """A handle on a running gen server: call it, cast to it, send it info, stop it."""

    __slots__ = ("_done", "_send", "_token", "alive", "name", "server")

    def __init__(self, server: GenServer, send: MemoryObjectSendStream[Any], name: str | None) -> None:
        #: The `GenServer` instance.
        self.server = server
        #: The registered name, if any.
        self.name = name
        #: Whether the server is still serving its mailbox.
        self.alive = True
        self._send = send
        self._done = anyio.Event()
        self._token = anyio.lowlevel.current_token()

    def __repr__(self) -> str:
        label = self.name or type(self.server).__name__
        return f"<ServerRef {label} {'alive' if self.alive else 'exited'}>"

    async def call(self, request: Any, timeout: float = 5.0) -> Any:
        """Send ``request`` to ``handle_call`` and wait at most ``timeout`` seconds for the reply.

        Raises `CallTimeout` (the late reply is then dropped) or
        `NotRunning` when the server is gone or ends before replying.
        """
        if not self.alive:
            raise NotRunning(f"{self!r} is not running")
        caller = Caller()
        try:
            with anyio.move_on_after(timeout):
                try:
                    await self._send.send(_Call(request, caller))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    raise NotRunning(f"{self!r} is not running") from None
                await caller._event.wait()
        finally:
            if not caller._event.is_set():
                caller.abandoned = True
                caller.answered = True
                if caller._pending is not None:
                    caller._pending.discard(caller)
        if not caller._event.is_set():
            raise CallTimeout(f"no reply from {self!r} to {request!r} within {timeout}s")
        if caller._error is not None:
            raise caller._error
        return caller._value

    def cast(self, message: Any) -> None:
        """Put ``message`` in the mailbox for ``handle_cast``; never blocks.

        Raises `MailboxFull` when the mailbox is full (the message is
        not delivered) and `NotRunning` when the server is gone.
        """
        self._put(_Cast(message))

    def send(self, message: Any) -> None:
        """Put ``message`` in the mailbox for ``handle_info``; same rules as `cast`."""
        self._put(_Info(message))

    def _put(self, item: Any) -> None:
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            raise MailboxFull(f"the mailbox of {self!r} is full") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise NotRunning(f"{self!r} is not running") from None

    async def stop(self, reason: BaseException | None = None) -> None:
        """Ask the server to stop after the messages already queued, and wait until it has.

        ``reason`` ``None`` is a normal exit; an exception makes it abnormal.
        """
        if self.alive:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._send.send(_StopMessage(reason))
        await self._done.wait()

    async def wait(self) -> None:
        """Wait until the server has ended."""
        await self._done.wait()


class GenServer:
    """Base class of gen-server-like processes.

    Example::

        class Counter(GenServer):
            async def init(self, start: int) -> None:
                self.value = start

            async def handle_call(self, request, caller):
                if request == "get":
                    return self.value

            async def handle_cast(self, message):
                self.value += message

        async with anyio.create_task_group() as tg:
            ref = await tg.start(Counter().run, 10)
            ref.cast(5)
            assert await ref.call("get") == 15
            await ref.stop()

    Put one in a supervisor with `child_spec`. ``mailbox_size`` bounds
    the mailbox (messages waiting to be handled).
    """

    #: How many messages may wait in the mailbox.
    mailbox_size: ClassVar[int] = 1024

    #: The running server's ref (set once ``init`` has returned).
    ref: ServerRef | None = None
    _stop_requested: bool = False
    _stop_reason: BaseException | None = None

    def init(self, *args: Any) -> Any:
        """Set up state from the start arguments; raising fails the start."""
        return None

    def handle_call(self, request: Any, caller: Caller) -> Any:
        """Answer a call: return the reply, or `NO_REPLY` and call ``caller.reply`` later."""
        raise NotImplementedError(f"{type(self).__name__} got a call it does not handle: {request!r}")

    def handle_cast(self, message: Any) -> Any:
        """Handle a cast; the return value is ignored."""
        raise NotImplementedError(f"{type(self).__name__} got a cast it does not handle: {message!r}")

    def handle_info(self, message: Any) -> Any:
        """Handle a message sent with `ServerRef.send`; by default it is logged and dropped."""
        logger.warning("%s got an unexpected message: %r", type(self).__name__, message)

    def terminate(self, reason: BaseException | None) -> Any:
        """Clean up; runs inside `cleanup_scope` when the server ends for any reason.

        ``reason`` is ``None`` for a normal stop, a `Shutdown` when its
        supervisor stopped it, or the exception that crashed it.
        """
        return None

    def stop(self, reason: BaseException | None = None) -> None:
        """From inside a callback: end after this message (``reason`` as in `ServerRef.stop`)."""
        self._stop_requested = True
        self._stop_reason = reason

    @classmethod
    def child_spec(
        cls,
        id: Hashable,
        *args: Any,
        name: str | None = None,
        restart: Restart | str = Restart.PERMANENT,
        shutdown: ShutdownValue = 5.0,
        significant: bool = False,
    ) -> ChildSpec:
        """A child spec that starts a fresh instance of this class with ``init(*args)``."""

        async def start(*start_args: Any, task_status: anyio.abc.TaskStatus[ServerRef]) -> None:
            await cls().run(*start_args, name=name, task_status=task_status)

        return ChildSpec(
            id=id,
            start=start,
            args=args,
            restart=restart,
            shutdown=shutdown,
            significant=significant,
        )

    async def run(
        self,
        *args: Any,
        name: str | None = None,
        task_status: anyio.abc.TaskStatus[ServerRef] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``init(*args)``, report a `ServerRef`, serve the mailbox until stopped."""
        send, receive = anyio.create_memory_object_stream[Any](self.mailbox_size or math.inf)
        ref = ServerRef(self, send, name)
        pending: set[Caller] = set()
        self._stop_requested = False
        self._stop_reason = None
        if name is not None:
            register(name, ref)
        reason: BaseException | None = None
        initialised = False
        try:
            await _maybe_await(self.init(*args))
            initialised = True
            self.ref = ref
            task_status.started(ref)
            async for message in receive:
                await self._dispatch(message, pending)
                if self._stop_requested:
                    break
            reason = self._stop_reason
        except anyio.get_cancelled_exc_class():
            reason = Shutdown("stopped by its supervisor")
            raise
        except BaseException as exc:
            reason = exc
            raise
        finally:
            ref.alive = False
            leave_all(ref)
            if name is not None:
                unregister(name)
            send.close()
            try:
                if initialised:
                    with cleanup_scope():
                        await _maybe_await(self.terminate(reason))
            finally:
                # Callers learn of the exit only once terminate has run, as in OTP.
                error = NotRunning(f"{ref!r} exited: {reason!r}" if reason else f"{ref!r} exited")
                for caller in list(pending):
                    caller._fail(error)
                while True:
                    try:
                        message = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    if isinstance(message, _Call):
                        message.caller._fail(error)
                receive.close()
                ref._done.set()
        if reason is not None:
            raise reason

    async def _dispatch(self, message: Any, pending: set[Caller]) -> None:
        if isinstance(message, _Call):
            caller = message.caller
            if caller.abandoned:
                return
            caller._pending = pending
            pending.add(caller)
            reply = await _maybe_await(self.handle_call(message.request, caller))
            if reply is not NO_REPLY:
                caller.reply(reply)
        elif isinstance(message, _Info):
            await _maybe_await(self.handle_info(message.message))
        elif isinstance(message, _Cast):
            await _maybe_await(self.handle_cast(message.message))
        elif isinstance(message, _StopMessage):
            self.stop(message.reason)


async def call(target: ServerRef | str, request: Any, timeout: float = 5.0) -> Any:
    """Call a gen server by ref or registered name (see `ServerRef.call`)."""
    ref: ServerRef = resolve(target)
    return await ref.call(request, timeout)


def cast(target: ServerRef | str, message: Any) -> None:
    """Cast to a gen server by ref or registered name (see `ServerRef.cast`)."""
    ref: ServerRef = resolve(target)
    ref.cast(message)


def send_info(target: ServerRef | str, message: Any) -> None:
    """Send an info message to a gen server by ref or registered name (see `ServerRef.send`)."""
    ref: ServerRef = resolve(target)
    ref.send(message)
