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
  anyio does for a task of its group;
* a group cancelled (another of its tasks failed) cancels the keeper, which stops every child
  and waits for them before it ends.
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

    __slots__ = ("_cancel_group", "_closing", "_errors", "_loop", "_running", "_wake", "open")

    def __init__(self, loop: asyncio.AbstractEventLoop, cancel_group: Callable[[], None]) -> None:
        self._loop = loop
        self._cancel_group = cancel_group
        self._running: dict[_Instance, asyncio.Task[None]] = {}
        self._errors: list[BaseException] = []
        self._wake: asyncio.Future[None] | None = None  # what the keeper sleeps on
        self._closing = False  # the supervisor has released its host: the keeper ends once no child runs
        #: Whether children may be started here (until the keeper ends).
        self.open = True

    def start(self, coro: Coroutine[Any, Any, None], instance: _Instance, name: str) -> None:
        """Run ``coro``, the run of ``instance``, as a task of the event loop; the run calls `ended`
        when it ends and `failed` for what it lets through (no done callback: one loop callback
        fewer per child)."""
        self._running[instance] = self._loop.create_task(coro, name=name)  # held: the loop holds tasks weakly

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
                self._wake = self._loop.create_future()
                await self._wake
        finally:
            self.open = False
            if self._running:  # a child failed, or the group is cancelled: stop the others, wait for them
                with anyio.CancelScope(shield=True):
                    await self._stop_all()
            self._wake = None
        errors = self._errors
        if errors:
            self._errors = []
            if len(errors) == 1:
                raise errors[0]
            raise BaseExceptionGroup("dynamic children failed", errors)

    async def _stop_all(self) -> None:
        self._closing = True
        for instance in list(self._running):
            instance.stopping = instance.handled = True  # stopped by its group: no exit to report
            if instance.cancel is not None:
                instance.cancel()  # else it has not begun: it sees ``stopping`` and cancels itself
        while self._running:
            self._wake = self._loop.create_future()
            await self._wake
