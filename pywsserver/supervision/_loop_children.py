"""The dynamic children `Supervisor.start_child_soon` starts on asyncio: tasks of the event loop,
kept by one task of the supervisor's task group.

Started with the task group's ``start_soon``, each child would get anyio's task handle (a
cancel scope and an event made, a wrapper coroutine, the scope entered and left, the group's
bookkeeping); the child's run (``Supervisor._run_instance``) already has a cancel scope of its
own, which is what stops it. Here each child is a plain task of the event loop, and one task of
the supervisor's group, the *keeper* (`LoopChildren.keep`), stands for all of them: about 54,000
instructions fewer per connection under callgrind (817,000 to 763,000 per handshake,
``benchmarks/instructions.py --mode handshake``).

What the task group would guarantee still holds:

* no child outlives its supervisor: the supervisor stops its children (each through its own
  cancel scope) before it releases its host task, and the keeper, a task of the host's group,
  ends only once every child has ended, so the group's exit waits for them all;
* a child that fails with an exception its run lets through (``BaseException`` that is not an
  ``Exception``) fails the group: the keeper stops the other children, waits for them, then
  raises it in the group, as anyio would have raised it for the child's own task;
* a child cancelled from outside (``Task.cancel``, not through its scope) cancels the group, as
  anyio does for a task of its group; the supervisor then fails (its children's group is gone)
  and its parent decides, as in OTP. A task cancelled before its first step never runs, so never
  says it ended: a stop, and the keeper, wait for the tasks themselves, never only for the runs'
  word, and find it then (not at once, as anyio's done callback would: no callback is kept per
  child);
* a group cancelled (another of its tasks failed) cancels the keeper, which stops every child
  and waits for them before it ends, then raises what they let through while stopping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._supervisor import _Instance

__all__ = ["LoopChildren"]


class LoopChildren:
    """One supervisor's dynamic children on asyncio, and the state of their keeper."""

    __slots__ = (
        "_cancel_group",
        "_closing",
        "_errors",
        "_loop",
        "_running",
        "_wake",
        "cancelled_from_outside",
        "open",
        "scope_type",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel_group: Callable[[], None]) -> None:
        self._loop = loop
        self._cancel_group = cancel_group
        self._running: dict[_Instance, asyncio.Task[None]] = {}
        self._errors: list[BaseException] = []
        self._wake: asyncio.Future[None] | None = None  # what the keeper sleeps on
        self._closing = False  # the supervisor has released its host: the keeper ends once no child runs
        #: Whether children may be started here (until the keeper ends).
        self.open = True
        #: Whether a child's task was cancelled from outside (which cancels the group).
        self.cancelled_from_outside = False
        #: The class of the cancel scopes `anyio.CancelScope` makes on asyncio, which each child's run
        #: enters: made directly, a scope skips anyio's look-up of the running library and its
        #: second ``__init__``: 572,800 to 562,600 instructions per handshake under callgrind.
        self.scope_type: type[anyio.CancelScope] = type(anyio.CancelScope())

    def start(self, coro: Coroutine[Any, Any, None], instance: _Instance, name: str) -> None:
        """Run ``coro``, the run of ``instance``, as a task of the event loop; the run calls `ended`
        when it ends and `failed` for what it lets through (no done callback: one loop callback
        fewer per child)."""
        task = self._loop.create_task(coro, name=name)
        if not task.done():  # an eager task factory (Python 3.12+) may have run it to its end already
            self._running[instance] = task  # held: the loop holds tasks weakly

    def ended(self, instance: _Instance) -> None:
        """``instance``'s run has ended."""
        running = self._running
        running.pop(instance, None)
        if self._closing and not running:
            self._wake_keeper()

    def failed(self, error: BaseException) -> None:
        """A run let ``error`` through: the keeper raises it in the group (a ``CancelledError``,
        which no scope of the run's own raised, cancels the group instead, as anyio does)."""
        if isinstance(error, asyncio.CancelledError):
            self.cancelled_from_outside = True
            self._cancel_group()
            return
        self._errors.append(error)
        self._wake_keeper()

    def _wake_keeper(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def close(self) -> None:
        """The supervisor releases its host (every child asked to stop): the keeper ends once they have."""
        self._closing = True
        self._wake_keeper()

    async def keep(self) -> None:
        """The task of the supervisor's group that stands for the children (see the module)."""
        try:
            while not self._errors and not (self._closing and not self._running):
                if self._closing:  # every child asked to stop: wait for their tasks themselves
                    await self._wait_tasks()
                    continue
                self._wake = self._loop.create_future()
                await self._wake
        finally:
            self.open = False
            if self._running:  # a child failed, or the group is cancelled: stop the others, wait for them
                with anyio.CancelScope(shield=True):
                    await self._stop_all()
            self._wake = None
            errors = self._errors
            if errors:  # raised here, not after: a keeper cancelled with its group must not lose them
                self._errors = []
                if len(errors) == 1:
                    raise errors[0]
                raise BaseExceptionGroup("dynamic children failed", errors)

    async def wait(self, instance: _Instance) -> None:
        """Until ``instance``'s run has ended (the supervisor stopping it waits here)."""
        task = self._running.get(instance)
        if task is not None:
            await asyncio.wait((task,))
            if self._running.get(instance) is task:
                self._never_ran(instance, task)
        await instance.wait_done()

    async def _stop_all(self) -> None:
        self._closing = True
        for instance in list(self._running):
            instance.stopping = instance.handled = True  # stopped by its group: no exit to report
            if instance.cancel is not None:
                instance.cancel()  # else it has not begun: it sees ``stopping`` and cancels itself
        await self._wait_tasks()

    async def _wait_tasks(self) -> None:
        """Until every child's task has ended. The tasks themselves are waited for, not the runs'
        word (`ended`): a task cancelled before its first step never runs, so never says so."""
        while self._running:
            await asyncio.wait(list(self._running.values()))
            for instance, task in list(self._running.items()):
                if task.done():
                    self._never_ran(instance, task)

    def _never_ran(self, instance: _Instance, task: asyncio.Task[None]) -> None:
        """``instance``'s task ended before its run took a step (``Task.cancel`` from outside): do
        what the run's end would have done, and cancel the group, as anyio does for a task of a
        group cancelled from outside."""
        del self._running[instance]
        instance.stopping = instance.handled = True
        instance.mark_done()
        if task.cancelled():
            self.cancelled_from_outside = True
            self._cancel_group()
