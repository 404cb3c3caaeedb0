"""The supervisor: starts children, watches them, restarts them by the OTP rules.

Theory of operation
-------------------
A supervisor is one task (`Supervisor.run`) that owns two things: a
*host* task holding the children's task group inside a shielded scope, and a
*loop* that handles one message at a time from an unbounded mailbox. Every
state change happens in the loop, so there is no locking:

* ``_Exit``: a child's wrapper reports that the child ended by itself (it
  returned, raised `Shutdown`, or raised another exception). The loop
  decides from the restart type whether to restart, applies the strategy,
  counts the restart against the intensity window and gives up when it is
  exceeded.
* ``_Request``: a dynamic API call (start/terminate/restart/delete a child)
  from any task, answered through a one-shot reply.
* ``_StopRequest``: `Supervisor.stop`.

Children are shielded from cancellation that hits the supervisor: when the
supervisor is cancelled (or stops, or gives up) it stops its children itself,
one at a time in reverse start order, each with its own ``shutdown`` deadline
(see `._context`). Only then does the host task end, so no child outlives
its supervisor and none is cancelled out of order.

Each run of a child is an ``_Instance``: its cancel scope, whether it has finished,
the ``ref`` it reported, and flags saying whether the supervisor is stopping
it (then its exit is not reported) or has already handled its exit (then a
late, queued exit message is ignored).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._context import ChildContext, _set_current, cleanup_scope, current_child
from ._errors import (
    ChildAlreadyPresent,
    ChildAlreadyStarted,
    ChildNotFound,
    ChildRestarting,
    ChildRunning,
    ChildStartError,
    NotRunning,
    RestartIntensityExceeded,
    SimpleOneForOneError,
    SupervisionError,
    SupervisorError,
    unwrap_group,
)
from ._loop_children import LoopChildren
from ._registry import register, unregister
from ._spec import INFINITY, AutoShutdown, ChildSpec, ChildType, Restart, Shutdown, ShutdownValue, Strategy

__all__ = ["ChildCounts", "ChildHandle", "ChildInfo", "ChildState", "Supervisor", "add_observer", "remove_observer"]

logger = logging.getLogger("pywsserver.supervision")

#: How long after its shutdown deadline a stopped child may take to finish unwinding before
#: the supervisor reports that it ignores cancellation and goes on without it.
_UNWIND_GRACE = 1.0

# The members read in every child's start and exit, as module globals: on Python 3.11 reading a
# member from its Enum class goes through ``EnumType.__getattr__`` (about 1,000 instructions under
# callgrind, a global read a few dozen).
_SIMPLE_ONE_FOR_ONE = Strategy.SIMPLE_ONE_FOR_ONE
_PERMANENT, _TRANSIENT, _TEMPORARY = Restart.PERMANENT, Restart.TRANSIENT, Restart.TEMPORARY


class ChildState(enum.Enum):
    """Where a child stands, as `Supervisor.which_children` reports it."""

    #: Started by `Supervisor.start_child_soon` and not yet ready (it has not called ``started``).
    STARTING = "starting"
    #: Ready and running (OTP: a pid).
    RUNNING = "running"
    #: Its last restart attempt failed; the supervisor retries through its mailbox (OTP: ``restarting``).
    RESTARTING = "restarting"
    #: Its spec is kept but it does not run (OTP: ``undefined``).
    NOT_RUNNING = "not_running"


@attrs.frozen
class ChildInfo:
    """One row of `Supervisor.which_children`."""

    #: The child's id; for a child of a simple_one_for_one supervisor, its `ChildHandle`.
    id: Hashable
    #: What the child passed to ``task_status.started``; ``None`` when not running.
    ref: Any
    #: Whether the child is running now and ready (``state is ChildState.RUNNING``).
    running: bool
    #: Worker or supervisor.
    type: ChildType
    #: The child's restart type.
    restart: Restart
    #: Running, starting, restarting or not running.
    state: ChildState = ChildState.NOT_RUNNING


@attrs.frozen
class ChildCounts:
    """The result of `Supervisor.count_children`, as OTP counts them."""

    #: Child specs known (running or not).
    specs: int
    #: Children running now.
    active: int
    #: Specs of type supervisor.
    supervisors: int
    #: Specs of type worker.
    workers: int


class _StartFailure:
    __slots__ = ("reason",)

    def __init__(self, reason: BaseException) -> None:
        self.reason = reason


class _StartedProxy:
    """Stands between a child and the real task status, to know whether it started."""

    __slots__ = ("_instance", "_real", "called", "cooperative")

    def __init__(self, real: anyio.abc.TaskStatus[Any], instance: _Instance) -> None:
        self._real = real
        self._instance = instance
        self.called = False
        #: The child runs without a cancel scope: it must give its stop function (`set_stop`).
        self.cooperative = False

    def started(self, value: Any = None) -> None:
        if self.called:
            raise RuntimeError("task_status.started() called twice")
        if self.cooperative and self._instance.cancel is None:  # nothing could ever stop it
            raise RuntimeError("a cooperative child gives its stop function (task_status.set_stop) before it starts")
        self.called = True
        self._instance.ref = value
        self._instance.ready = True
        self._real.started(value)

    def set_stop(self, stop: Callable[[], None]) -> None:
        """How the supervisor stops the child, if it has no cancel scope of its own (a cooperative child).

        A dynamic child of a supervisor whose children stop cooperatively (the server's workers on
        asyncio, see ``Supervisor._cooperative_children``) runs without a cancel scope: the child
        gives here, before it says it has started, a function that makes it stop as cancellation
        would (the first call; a second call is the supervisor's kill, when its shutdown time is up).
        Ignored for every other child (its cancel scope or task handle stops it).
        """
        instance = self._instance
        if instance.cancel is None:
            instance.cancel = stop
            if instance.stopping:  # asked to stop while it was being started
                stop()


class _Instance:
    __slots__ = ("_done_event", "cancel", "child", "context", "finished", "handled", "ready", "ref", "stopping")

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.context = ChildContext(child.key, child.spec.shutdown_seconds)
        # Cancels the child: its own cancel scope's, or its task handle's (started by start_child_soon).
        self.cancel: Callable[[], None] | None = None
        self.finished = False
        # Made only when someone waits for the end (a stop): thousands of workers never need one.
        self._done_event: anyio.Event | None = None
        self.ref: Any = None
        self.ready = False
        self.stopping = False
        self.handled = False

    def mark_done(self) -> None:
        self.finished = True
        if self._done_event is not None:
            self._done_event.set()

    async def wait_done(self) -> None:
        if self.finished:
            return
        if self._done_event is None:
            self._done_event = anyio.Event()
        await self._done_event.wait()


class ChildHandle:
    """Names one child of its supervisor, as a pid names an Erlang process.

    `Supervisor.start_child` on a simple_one_for_one supervisor returns it
    and `Supervisor.terminate_child` takes it; it is the ``id`` of that
    child's `ChildInfo` row. Two handles are the same child only if they are
    the same object. It names the child across its restarts (its `ref`
    changes, the handle does not); once the child has ended for good,
    terminating it again succeeds quietly, as OTP does for a pid that is no
    longer alive.
    """

    __slots__ = ("args", "instance", "key", "owner", "restarting", "spec")

    def __init__(self, owner: Supervisor, key: Hashable, spec: ChildSpec, args: tuple[Any, ...]) -> None:
        self.owner = owner
        self.key = key
        self.spec = spec
        self.args = args
        self.instance: _Instance | None = None
        self.restarting = False

    def __repr__(self) -> str:
        return f"<ChildHandle {self.key!r} of supervisor {self.owner.label}>"

    @property
    def ref(self) -> Any:
        """What the child's current run passed to ``task_status.started`` (``None`` when not running)."""
        instance = self.instance
        return instance.ref if instance is not None else None

    @property
    def state(self) -> ChildState:
        """Whether the child is starting, running, restarting or not running."""
        instance = self.instance
        if instance is not None:
            return ChildState.RUNNING if instance.ready else ChildState.STARTING
        return ChildState.RESTARTING if self.restarting else ChildState.NOT_RUNNING


_Child = ChildHandle


@attrs.frozen
class _Exit:
    instance: _Instance
    reason: BaseException | None


class _Reply:
    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


@attrs.frozen
class _Retry:
    """Try again a restart that failed (OTP's ``try_again_restart``, sent to itself)."""

    child: _Child
    group: list[_Child]
    reason: BaseException | None


@attrs.frozen
class _Request:
    operation: Callable[..., Any]
    args: tuple[Any, ...]
    reply: _Reply


class _StopRequest:
    pass


class _GiveUp(Exception):
    def __init__(self, child_id: object, reason: BaseException | None) -> None:
        self.child_id = child_id
        self.reason = reason


class _AutoShutdownNow(Exception):
    pass


async def _noop() -> None:
    return None


#: The name of every task start_child_soon starts (in anyio's and asyncio's task listings).
_DYNAMIC_CHILD_TASK = "pywsserver.supervision dynamic child"
#: The name of the task that keeps them on asyncio (``_loop_children``).
_DYNAMIC_CHILDREN_KEEPER = "pywsserver.supervision dynamic children's keeper"


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio event loop, or ``None`` (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _is_abnormal(reason: BaseException | None) -> bool:
    return reason is not None and not isinstance(reason, Shutdown)


class Supervisor:
    """An OTP-style supervisor on anyio.

    Example::

        supervisor = Supervisor(
            [ChildSpec(id="db", start=db_pool), ChildSpec(id="api", start=api_server)],
            strategy=Strategy.REST_FOR_ONE,
            intensity=3,
            period=10,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)  # returns once every child is ready
            ...
            await supervisor.stop()

    ``intensity`` restarts within ``period`` seconds are allowed, counted
    across all children; one more and the supervisor stops every child and
    `run` raises `RestartIntensityExceeded`. With
    ``Strategy.SIMPLE_ONE_FOR_ONE`` the one spec given is a template and
    children are started with `start_child`. ``name`` registers the
    supervisor (see `whereis`) and labels its log reports. ``clock``
    replaces `anyio.current_time` for the intensity window (for tests).
    """

    def __init__(
        self,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        intensity: int = 1,
        period: float = 5.0,
        auto_shutdown: AutoShutdown | str = AutoShutdown.NEVER,
        name: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        label = f"supervisor {name!r}" if name else "supervisor"
        try:
            self.strategy = Strategy(strategy)
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in Strategy)
            raise ValueError(f"{label}: 'strategy' must be one of {allowed}, got {strategy!r}") from None
        try:
            self.auto_shutdown = AutoShutdown(auto_shutdown)
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in AutoShutdown)
            raise ValueError(f"{label}: 'auto_shutdown' must be one of {allowed}, got {auto_shutdown!r}") from None
        if isinstance(intensity, bool) or not isinstance(intensity, int) or intensity < 0:
            raise ValueError(f"{label}: 'intensity' must be an int >= 0, got {intensity!r}")
        if isinstance(period, bool) or not isinstance(period, int | float) or not period > 0:
            raise ValueError(f"{label}: 'period' must be a number of seconds > 0, got {period!r}")
        specs = tuple(children)
        for spec in specs:
            if not isinstance(spec, ChildSpec):
                raise TypeError(f"{label}: children must be ChildSpec instances, got {spec!r}")
        seen: set[Hashable] = set()
        for spec in specs:
            if spec.id in seen:
                raise ValueError(f"{label}: duplicate child id {spec.id!r}")
            seen.add(spec.id)
        if self.strategy is _SIMPLE_ONE_FOR_ONE and len(specs) != 1:
            raise ValueError(f"{label}: a simple_one_for_one supervisor takes exactly one child spec (the template)")
        self.intensity = intensity
        self.period = float(period)
        self.name = name
        self.specs: tuple[ChildSpec, ...] = specs
        self._clock = clock or anyio.current_time
        self._children: dict[Hashable, _Child] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._restart_count = 0
        self._keys = itertools.count(1)
        self._running = False
        self._stopped = anyio.Event()
        self._children_tg: anyio.abc.TaskGroup | None = None
        # The dynamic children of start_child_soon on asyncio (see ``_loop_children``), else None.
        self._loop_children: LoopChildren | None = None
        # Whether the dynamic children on asyncio stop cooperatively (set by the server for its
        # workers, see `_StartedProxy.set_stop`): each child's run then enters no cancel scope.
        self._cooperative_children = False
        self._host_release: anyio.Event | None = None
        self._send: MemoryObjectSendStream[Any] | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self.label} {self.strategy.value}>"

    @property
    def label(self) -> str:
        """The name used in log reports and errors."""
        return repr(self.name) if self.name else f"at 0x{id(self):x}"

    @property
    def is_running(self) -> bool:
        """Whether `run` is running and accepting requests."""
        return self._running

    @property
    def restart_count(self) -> int:
        """How many restarts this supervisor has made since `run` began."""
        return self._restart_count

    def child_spec(
        self,
        id: Hashable | None = None,
        *,
        restart: Restart | str = Restart.PERMANENT,
        shutdown: ShutdownValue = INFINITY,
        significant: bool = False,
    ) -> ChildSpec:
        """A spec that runs this supervisor as a child of another one.

        A restart runs it again from its static child specs, as in OTP.
        """
        return ChildSpec(
            id=id if id is not None else (self.name or "supervisor"),
            start=self.run,
            restart=restart,
            type=ChildType.SUPERVISOR,
            shutdown=shutdown,
            significant=significant,
        )

    # ----------------------------------------------------------------- running

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        """Run the supervisor for the duration of an ``async with`` block.

        Entering returns once every child is ready (or raises
        `ChildStartError`); leaving stops the children in reverse start
        order. If the supervisor gives up while the block runs, the block is
        cancelled and `RestartIntensityExceeded` is raised from the
        ``async with``, not wrapped in an exception group::

            async with Supervisor(specs).running() as supervisor:
                ...
        """
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.run)
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.stop()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def run(self, *, task_status: anyio.abc.TaskStatus[Supervisor] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every child in order, report ready, then supervise until stopped.

        Returns when `stop` is called or a significant child ends the
        supervisor (``auto_shutdown``). Raises `ChildStartError` when a
        child fails to start (the children already started are stopped first)
        and `RestartIntensityExceeded` when it gives up.
        """
        if self._running:
            raise RuntimeError(f"supervisor {self.label} is already running")
        self._reset()
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._send = send
        error: BaseException | None = None
        registered = False
        async with anyio.create_task_group() as tg:
            await tg.start(self._host)
            try:
                if self.name is not None:
                    register(self.name, self)
                    registered = True
                self._running = True
                await self._start_group(list(self._children.values()))
                task_status.started(self)
                await self._loop(receive)
            except _GiveUp as give_up:
                _notify(self, "give_up", give_up.child_id)
                logger.error(
                    "supervisor %s gave up: restart intensity %d in %gs exceeded; last child to fail was %r",
                    self.label,
                    self.intensity,
                    self.period,
                    give_up.child_id,
                )
                error = RestartIntensityExceeded(self.label, give_up.child_id, give_up.reason)
            except ChildStartError as start_error:
                error = start_error
            finally:
                self._running = False
                # As a child, the supervisor's own shutdown time bounds the stop of its children
                # (its parent's deadline); at the top nothing does: each child's own shutdown governs.
                stop_scope = cleanup_scope() if current_child() is not None else anyio.CancelScope(shield=True)
                with stop_scope:
                    await self._terminate_all()
                self._kill_remaining()
                assert self._host_release is not None
                self._host_release.set()
                send.close()
                self._fail_pending(receive)
                receive.close()
                if registered and self.name is not None:
                    unregister(self.name)
                self._stopped.set()
        if error is not None:
            raise error

    async def stop(self) -> None:
        """Stop every child in reverse start order and end `run` normally."""
        if not self._running or self._send is None:
            return
        stopped = self._stopped
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(_StopRequest())
        await stopped.wait()

    def _reset(self) -> None:
        self._children = {spec.id: _Child(self, spec.id, spec, spec.args) for spec in self.specs}
        if self.strategy is _SIMPLE_ONE_FOR_ONE:
            self._children = {}
        self._restarts.clear()
        self._restart_count = 0
        self._stopped = anyio.Event()
        self._host_release = anyio.Event()

    async def _host(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self._host_release is not None
        release = self._host_release
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                self._children_tg = tg
                loop_children = None
                if self.strategy is _SIMPLE_ONE_FOR_ONE:
                    loop = _asyncio_loop()
                    if loop is not None:
                        loop_children = self._loop_children = LoopChildren(loop, tg.cancel_scope.cancel)
                        tg.start_soon(loop_children.keep, name=_DYNAMIC_CHILDREN_KEEPER)
                task_status.started()
                try:
                    await release.wait()
                finally:
                    if loop_children is not None:
                        loop_children.close()
        self._children_tg = None
        self._loop_children = None
        if not release.is_set() or (loop_children is not None and loop_children.cancelled_from_outside):
            # Only a child's task cancelled from outside (``Task.cancel`` on asyncio) cancels the
            # children's group: it is gone, so the supervisor fails, and its parent decides.
            raise SupervisionError(
                f"supervisor {self.label}: a child's task was cancelled from outside the supervisor "
                "(Task.cancel), which cancelled the group its children run in"
            )

    async def _loop(self, receive: MemoryObjectReceiveStream[Any]) -> None:
        async for message in receive:
            if isinstance(message, _Exit):
                try:
                    await self._handle_exit(message.instance, message.reason)
                except _AutoShutdownNow:
                    logger.debug("supervisor %s shutting down: significant child ended", self.label)
                    return
            elif isinstance(message, _Retry):
                await self._retry(message)
            elif isinstance(message, _Request):
                try:
                    value = await message.operation(*message.args)
                except (SupervisorError, TypeError) as error:
                    message.reply.fail(error)
                else:
                    message.reply.set(value)
            elif isinstance(message, _StopRequest):
                return
            # Waiting for the next message must not keep this one (and the exited child) alive.
            del message

    def _fail_pending(self, receive: MemoryObjectReceiveStream[Any]) -> None:
        while True:
            try:
                message = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            if isinstance(message, _Request):
                message.reply.fail(NotRunning(f"supervisor {self.label} is not running"))

    # ----------------------------------------------------------- child starts

    async def _run_instance(
        self,
        instance: _Instance,
        loop_children: LoopChildren | None = None,
        *,
        task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        _set_current(instance.context)
        child = instance.child
        proxy = _StartedProxy(task_status, instance)
        reason: BaseException | None = None
        try:
            if loop_children is not None and self._cooperative_children and instance.cancel is None:
                # No cancel scope: the child gives its stop function (`_StartedProxy.set_stop`). A scope
                # entered and left costs about 22,000 instructions per child under callgrind (517,200
                # to 495,000 per handshake, benchmarks/instructions.py --mode handshake) and two getpid
                # system calls (asyncio.current_task's check against a fork).
                proxy.cooperative = True
                try:
                    await child.spec.start(*child.args, task_status=proxy)
                except Exception as exc:
                    reason = exc
            elif instance.cancel is None:
                with anyio.CancelScope() if loop_children is None else loop_children.scope_type() as scope:
                    instance.cancel = scope.cancel
                    if instance.stopping:
                        scope.cancel()
                    try:
                        await child.spec.start(*child.args, task_status=proxy)
                    except Exception as exc:
                        reason = exc
            else:
                # Started by start_child_soon in a task group (trio): cancelled through its task's
                # handle, whose scope ends the task quietly. Cancelled means stopped: nothing to report.
                try:
                    await child.spec.start(*child.args, task_status=proxy)
                except Exception as exc:
                    reason = exc
            if not proxy.called:
                if reason is None:
                    reason = RuntimeError("the child returned without calling task_status.started()")
                if task_status is anyio.TASK_STATUS_IGNORED:  # started by start_child_soon: nobody waits
                    if not instance.stopping:  # (stopped before it was ready is no failure)
                        self._start_failed(instance, reason)
                    self._children.pop(child.key, None)
                else:
                    task_status.started(_StartFailure(reason))
                return
            if instance.stopping:
                return
            if self.strategy is _SIMPLE_ONE_FOR_ONE and not self._needs_loop(child, reason):
                # Nothing to restart and nobody else affected: forget the child here, sparing
                # the hop through the supervisor's mailbox (one per closed connection).
                self._exited(instance, reason)
            elif self._send is not None:
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    self._send.send_nowait(_Exit(instance, reason))
        except BaseException as error:
            if loop_children is None or isinstance(error, GeneratorExit):
                raise
            loop_children.failed(error)  # a task of the event loop: its keeper raises it in the group
        finally:
            instance.mark_done()
            if loop_children is not None:
                loop_children.ended(instance)

    async def _start(self, child: _Child) -> Any:
        assert self._children_tg is not None
        instance = _Instance(child)
        child.instance = instance
        result = await self._children_tg.start(self._run_instance, instance)
        if isinstance(result, _StartFailure):
            self._start_failed(instance, result.reason)
            raise ChildStartError(child.key, result.reason)
        return result

    def _start_failed(self, instance: _Instance, reason: BaseException) -> None:
        child = instance.child
        instance.handled = True
        child.instance = None
        logger.error(
            "child %r of supervisor %s failed to start: %r",
            child.key,
            self.label,
            reason,
            exc_info=reason,
        )

    # ----------------------------------------------------------- child stops

    def _ask_to_stop(self, child: _Child) -> None:
        instance = child.instance
        if instance is None or instance.stopping:
            return
        instance.stopping = True
        instance.handled = True
        if not instance.finished:
            instance.context.stop_deadline = anyio.current_time() + child.spec.shutdown_seconds
            if instance.cancel is not None:  # else the child is still being started: it cancels itself
                instance.cancel()

    async def _terminate(self, child: _Child) -> None:
        instance = child.instance
        if instance is None:
            return
        self._ask_to_stop(child)
        deadline = instance.context.stop_deadline
        loop_children = self._loop_children
        with anyio.move_on_after(math.inf) as scope:
            if deadline is not None:
                scope.deadline = deadline + _UNWIND_GRACE
            if loop_children is not None:
                await loop_children.wait(instance)  # its task, which may end without its run (see there)
            else:
                await instance.wait_done()
        if not instance.finished and scope.cancelled_caught:
            # OTP would now kill it; Python cannot end a task that ignores cancellation. Report it
            # and go on with the next child: the supervisor's task group still waits for it.
            logger.error(
                "child %r of supervisor %s did not stop within its shutdown time (%s): it ignores "
                "cancellation, which cannot be forced in Python; going on without it, the supervisor "
                "ends only when it does",
                child.key,
                self.label,
                child.spec.shutdown,
            )
        if child.instance is instance:
            child.instance = None

    def _kill_remaining(self) -> None:
        """Cancel at once, cleanup included, every child still running (the supervisor's own time is up)."""
        now = anyio.current_time()
        for child in self._children.values():
            instance = child.instance
            if instance is None or instance.finished:
                continue
            instance.stopping = instance.handled = True
            instance.context.kill(now)
            if instance.cancel is not None:
                instance.cancel()

    async def _terminate_all(self) -> None:
        while True:  # again, for instances started concurrently by start_child
            children = [child for child in self._children.values() if child.instance is not None]
            if not children:
                return
            if self.strategy is _SIMPLE_ONE_FOR_ONE:
                # As in OTP, the children of a dynamic supervisor are all asked at
                # once, then waited for: their order means nothing.
                for child in children:
                    self._ask_to_stop(child)
            for child in reversed(children):
                await self._terminate(child)

    # ------------------------------------------------------------- restarts

    @staticmethod
    def _will_restart(child: _Child, reason: BaseException | None) -> bool:
        """Whether the child is restarted after ending with ``reason`` (its restart type says)."""
        restart = child.spec.restart
        return restart is _PERMANENT or (restart is _TRANSIENT and _is_abnormal(reason))

    @classmethod
    def _needs_loop(cls, child: _Child, reason: BaseException | None) -> bool:
        """Whether an exit asks more of the supervisor than forgetting the child (a restart, a shutdown)."""
        return child.spec.significant or cls._will_restart(child, reason)

    def _exited(self, instance: _Instance, reason: BaseException | None) -> bool:
        """Record a child's exit and report it; ``True`` if the supervisor must act on it."""
        child = instance.child
        if instance.handled or child.instance is not instance:
            return False
        instance.handled = True
        child.instance = None
        if _is_abnormal(reason):
            logger.error(
                "child %r of supervisor %s crashed: %r",
                child.key,
                self.label,
                reason,
                exc_info=reason,
            )
        elif logger.isEnabledFor(logging.DEBUG):  # the label is built only if it is logged (one per connection)
            logger.debug("child %r of supervisor %s exited normally", child.key, self.label)
        if self._will_restart(child, reason):
            return True
        if child.spec.restart is _TEMPORARY or self.strategy is _SIMPLE_ONE_FOR_ONE:
            self._children.pop(child.key, None)
        return child.spec.significant

    async def _handle_exit(self, instance: _Instance, reason: BaseException | None) -> None:
        if not self._exited(instance, reason):
            return
        child = instance.child
        if self._will_restart(child, reason):
            await self._restart(child, reason)
        else:  # a significant child that ended for good
            self._check_auto_shutdown()

    def _check_auto_shutdown(self) -> None:
        if self.auto_shutdown is AutoShutdown.ANY_SIGNIFICANT:
            raise _AutoShutdownNow()
        if self.auto_shutdown is AutoShutdown.ALL_SIGNIFICANT and not any(
            c.spec.significant and c.instance is not None for c in self._children.values()
        ):
            raise _AutoShutdownNow()

    def _add_restart(self, child_id: object, reason: BaseException | None) -> None:
        now = self._clock()
        restarts = self._restarts
        restarts.append(now)
        while restarts and now - restarts[0] >= self.period:
            restarts.popleft()
        if len(restarts) > self.intensity:
            raise _GiveUp(child_id, reason)

    async def _restart(self, child: _Child, reason: BaseException | None) -> None:
        if self.strategy in (Strategy.ONE_FOR_ONE, _SIMPLE_ONE_FOR_ONE):
            group = [child]
        else:
            order = list(self._children.values())
            index = order.index(child)
            others = order if self.strategy is Strategy.ONE_FOR_ALL else order[index + 1 :]
            group = []
            for sibling in reversed(others):
                if sibling is child:
                    continue
                was_running = sibling.instance is not None
                await self._terminate(sibling)
                if sibling.spec.restart is _TEMPORARY:
                    self._children.pop(sibling.key, None)
                elif was_running:
                    group.append(sibling)
            group.append(child)
            group.sort(key=order.index)
        await self._attempt_restart(child, group, reason)

    async def _attempt_restart(self, child: _Child, group: list[_Child], reason: BaseException | None) -> None:
        """One restart attempt of ``group`` for ``child``; a failed one is retried through the mailbox.

        As in OTP, every attempt counts toward the intensity, and between
        attempts the supervisor serves its mailbox with the child that failed
        to start marked restarting.
        """
        self._add_restart(child.key, reason)
        self._restart_count += 1
        _notify(self, "restart", child.key)
        child.restarting = False
        try:
            await self._start_group(group, stop_started=False)
        except ChildStartError as error:
            failed = self._children.get(error.child_id, child)
            failed.restarting = True
            assert self._send is not None
            self._send.send_nowait(_Retry(failed, group, error.reason))
            return
        logger.info(
            "supervisor %s restarted %s after %r",
            self.label,
            ", ".join(repr(c.key) for c in group),
            reason,
        )

    async def _retry(self, retry: _Retry) -> None:
        child = retry.child
        if not child.restarting or self._children.get(child.key) is not child:
            return  # terminated or deleted meanwhile: no more attempts (OTP ignores the retry too)
        group = [c for c in retry.group if self._children.get(c.key) is c]
        for sibling in reversed(group):  # those started by the failed attempt start again with the rest
            await self._terminate(sibling)
        await self._attempt_restart(child, group, retry.reason)

    async def _start_group(self, group: list[_Child], *, stop_started: bool = True) -> None:
        started: list[_Child] = []
        for child in group:
            try:
                await self._start(child)
            except ChildStartError:
                if stop_started:
                    for done in reversed(started):
                        await self._terminate(done)
                raise
            started.append(child)

    # ------------------------------------------------------------ dynamic API

    async def _request(self, operation: Callable[..., Any], *args: Any) -> Any:
        send = self._send
        if not self._running or send is None:
            raise NotRunning(f"supervisor {self.label} is not running")
        reply = _Reply()
        try:
            send.send_nowait(_Request(operation, args, reply))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise NotRunning(f"supervisor {self.label} is not running") from None
        return await reply.wait()

    async def start_child(self, *args: Any) -> Any:
        """Start a new child and return once it is ready.

        For a static supervisor pass one `ChildSpec`; it is added after
        the existing children and its ref is returned. For a simple_one_for_one
        supervisor pass extra positional arguments, appended to the template's
        ``args``; the `ChildHandle` naming that child is returned (OTP returns
        its pid), its ``ref`` being what the child reported. Raises
        `ChildAlreadyStarted`, `ChildAlreadyPresent` or `ChildStartError`.
        """
        if self.strategy is _SIMPLE_ONE_FOR_ONE and self._running and self._children_tg is not None:
            # Starting one more instance of the template touches no other child: it runs in the
            # caller's task, sparing the hop through the supervisor's mailbox (the server starts a
            # worker per connection this way).
            return await self._start_child(args)
        return await self._request(self._start_child, args)

    def start_child_soon(self, *args: Any) -> ChildHandle:
        """Start a new child of a simple_one_for_one supervisor without waiting for it to be ready.

        The arguments are those of `start_child`; the `ChildHandle` of the
        child is returned at once (its state is ``starting`` until it is
        ready). The child starts when the caller next yields; a child that
        fails to start is logged and forgotten, as a failed `start_child`
        would be, but nobody receives the error. Raises `NotRunning` when the
        supervisor is not running. The server's acceptors start a worker per
        connection this way, as Ranch's acceptors hand connections to their
        connection supervisor.
        """
        self._no_static("start_child_soon")
        tg = self._children_tg
        if not self._running or tg is None:
            raise NotRunning(f"supervisor {self.label} is not running")
        template = self.specs[0]
        child = _Child(self, next(self._keys), template, template.args + args)
        self._children[child.key] = child
        instance = child.instance = _Instance(child)
        loop_children = self._loop_children
        if loop_children is not None and loop_children.open:
            # A task of the event loop, kept by the group's keeper: its run's own cancel scope stops it
            # (``_loop_children``: 54,000 instructions fewer per connection than anyio's task handle).
            loop_children.start(self._run_instance(instance, loop_children), instance, _DYNAMIC_CHILD_TASK)
        else:
            # A name given once (anyio would otherwise build one string per task).
            instance.cancel = tg.start_soon(self._run_instance, instance, name=_DYNAMIC_CHILD_TASK).cancel
        return child

    async def terminate_child(self, child_id: object) -> None:
        """Stop a running child (its spec is kept unless it is temporary or dynamic).

        For a simple_one_for_one supervisor ``child_id`` is the child's
        `ChildHandle`; a handle whose child has already ended is no error (as
        OTP's pid that is no longer alive), one of another supervisor raises
        `ChildNotFound`, anything else `SimpleOneForOneError`. A child being
        restarted (state ``restarting``) is stopped: no more attempts are made.
        Raises `ChildNotFound`.
        """
        await self._request(self._terminate_child, child_id)

    async def restart_child(self, child_id: Hashable) -> Any:
        """Start again a stopped child whose spec is kept; return its new ref.

        Raises `ChildNotFound`, `ChildRunning`, `ChildRestarting` (its
        restart is being retried) or `ChildStartError`; on a simple_one_for_one
        supervisor, `SimpleOneForOneError`.
        """
        return await self._request(self._restart_child, child_id)

    async def delete_child(self, child_id: Hashable) -> None:
        """Forget the spec of a stopped child.

        Raises `ChildNotFound`, `ChildRunning` or `ChildRestarting`; on a
        simple_one_for_one supervisor, `SimpleOneForOneError`.
        """
        await self._request(self._delete_child, child_id)

    async def settle(self) -> None:
        """Wait until every message already in the supervisor's mailbox has been handled.

        Exits reported before this call (and the restarts they cause) are
        done when it returns; useful in tests, as ``sys:get_state`` is in OTP.
        A restart attempt that fails is tried again by a message queued then,
        behind this call (OTP's ``try_again_restart``): the child may still be
        ``restarting`` when it returns, and each further call waits for one
        more attempt.
        """
        await self._request(_noop)

    def which_children(self) -> list[ChildInfo]:
        """Every child the supervisor knows, in start order: a snapshot taken now.

        The snapshot includes every call already answered and every dynamic
        child already started (or started soon), but not exits still waiting in
        the mailbox: a child that has just ended may show as running until the
        supervisor handles its exit. `children` is the call form, ordered with
        everything asked of the supervisor before it, as OTP's ``which_children``.
        """
        return [self._info(child) for child in self._children.values()]

    def count_children(self) -> ChildCounts:
        """How many specs, running children, supervisors and workers there are: a snapshot taken now.

        ``active`` counts every child whose task runs (starting ones
        included). On a simple_one_for_one supervisor ``specs`` is 1 (the
        template) and ``supervisors``/``workers`` count the children, as in
        OTP. `counts` is the call form (see `which_children`).
        """
        children = self._children.values()
        active = sum(1 for c in children if c.instance is not None)
        if self.strategy is _SIMPLE_ONE_FOR_ONE:
            dynamic = len(self._children)
            is_supervisor = self.specs[0].type is ChildType.SUPERVISOR
            return ChildCounts(
                specs=1,
                active=active,
                supervisors=dynamic if is_supervisor else 0,
                workers=0 if is_supervisor else dynamic,
            )
        supervisors = sum(1 for c in children if c.spec.type is ChildType.SUPERVISOR)
        return ChildCounts(
            specs=len(self._children),
            active=active,
            supervisors=supervisors,
            workers=len(self._children) - supervisors,
        )

    async def children(self) -> list[ChildInfo]:
        """`which_children` as a call: answered after everything asked of the supervisor before it.

        Exits and restarts already in the mailbox are handled first, so the
        answer agrees with every `start_child`, `terminate_child` or crash that
        came before it. Raises `NotRunning`.
        """
        result: list[ChildInfo] = await self._request(self._answer, self.which_children)
        return result

    async def counts(self) -> ChildCounts:
        """`count_children` as a call, ordered as `children` is. Raises `NotRunning`."""
        result: ChildCounts = await self._request(self._answer, self.count_children)
        return result

    @staticmethod
    async def _answer(question: Callable[[], Any]) -> Any:
        return question()

    def _info(self, child: _Child) -> ChildInfo:
        state = child.state
        return ChildInfo(
            id=child if self.strategy is _SIMPLE_ONE_FOR_ONE else child.key,
            ref=child.ref,
            running=state is ChildState.RUNNING,
            type=child.spec.type,
            restart=child.spec.restart,
            state=state,
        )

    def _find(self, child_id: object) -> _Child:
        if self.strategy is _SIMPLE_ONE_FOR_ONE:
            if not isinstance(child_id, ChildHandle):
                raise SimpleOneForOneError(
                    f"the simple_one_for_one supervisor {self.label} names its children by the ChildHandle "
                    f"start_child returned, not {child_id!r}"
                )
            if child_id.owner is not self:
                raise ChildNotFound(child_id)
            return child_id
        with contextlib.suppress(KeyError, TypeError):
            return self._children[child_id]
        raise ChildNotFound(child_id)

    def _no_static(self, operation: str) -> None:
        if self.strategy is not _SIMPLE_ONE_FOR_ONE:
            raise SupervisorError(f"{operation} is only available on a simple_one_for_one supervisor, not {self.label}")

    def _no_dynamic(self, operation: str) -> None:
        if self.strategy is _SIMPLE_ONE_FOR_ONE:
            raise SimpleOneForOneError(
                f"{operation} is not available on the simple_one_for_one supervisor {self.label}"
            )

    async def _start_child(self, args: tuple[Any, ...]) -> Any:
        if self.strategy is _SIMPLE_ONE_FOR_ONE:
            template = self.specs[0]
            child = _Child(self, next(self._keys), template, template.args + args)
        else:
            if len(args) != 1 or not isinstance(args[0], ChildSpec):
                raise TypeError("start_child on a static supervisor takes one ChildSpec")
            spec: ChildSpec = args[0]
            existing = self._children.get(spec.id)
            if existing is not None:
                if existing.instance is not None:
                    raise ChildAlreadyStarted(spec.id, existing.instance.ref)
                raise ChildAlreadyPresent(spec.id)
            child = _Child(self, spec.id, spec, spec.args)
        self._children[child.key] = child
        try:
            ref = await self._start(child)
        except ChildStartError:
            self._children.pop(child.key, None)
            raise
        return child if self.strategy is _SIMPLE_ONE_FOR_ONE else ref

    async def _terminate_child(self, child_id: object) -> None:
        child = self._find(child_id)
        if self._children.get(child.key) is not child:
            return  # a dynamic child that has already ended: nothing to do, as for OTP's dead pid
        child.restarting = False
        await self._terminate(child)
        if child.spec.restart is _TEMPORARY or self.strategy is _SIMPLE_ONE_FOR_ONE:
            self._children.pop(child.key, None)

    async def _restart_child(self, child_id: Hashable) -> Any:
        self._no_dynamic("restart_child")
        child = self._find(child_id)
        if child.restarting:
            raise ChildRestarting(child_id)
        if child.instance is not None:
            raise ChildRunning(child_id)
        return await self._start(child)

    async def _delete_child(self, child_id: Hashable) -> None:
        self._no_dynamic("delete_child")
        child = self._find(child_id)
        if child.restarting:
            raise ChildRestarting(child_id)
        if child.instance is not None:
            raise ChildRunning(child_id)
        del self._children[child.key]


#: See `add_observer`.
_observers: list[Callable[[Supervisor, str, Hashable], None]] = []


def add_observer(observer: Callable[[Supervisor, str, Hashable], None]) -> None:
    """Call ``observer(supervisor, event, child_id)`` at every restart and give-up of any supervisor.

    ``event`` is ``"restart"`` (once per restart counted against the
    intensity, with the id of the child whose exit caused it) or
    ``"give_up"`` (the supervisor exceeded its intensity and fails). The
    observer runs inside the supervisor: it must be quick and must not
    block; an exception it raises is logged and ignored. The server's
    metrics count restarts this way.
    """
    _observers.append(observer)


def remove_observer(observer: Callable[[Supervisor, str, Hashable], None]) -> None:
    """Stop calling an observer given to `add_observer` (nothing happens if it was not given)."""
    with contextlib.suppress(ValueError):
        _observers.remove(observer)


def _notify(supervisor: Supervisor, event: str, child_id: Hashable) -> None:
    for observer in tuple(_observers):
        try:
            observer(supervisor, event, child_id)
        except Exception:
            logger.exception("supervisor observer %r failed on %s of %r", observer, event, child_id)
