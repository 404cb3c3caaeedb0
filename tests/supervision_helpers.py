"""Controllable children for supervision tests: they start, then wait to be told how to end."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import anyio
import anyio.abc

from pywsserver.supervision import ChildSpec, Shutdown, Supervisor


class Control:
    """The handle a probe child reports as its ref."""

    def __init__(self, child_id: Hashable) -> None:
        self.child_id = child_id
        self.command: str | None = None
        self.go = anyio.Event()
        self.exited = anyio.Event()

    async def end(self, how: str, supervisor: Supervisor | None = None) -> None:
        """End the child ("crash", "exit" or "shutdown") and let the supervisor react."""
        self.command = how
        self.go.set()
        await self.exited.wait()
        if supervisor is not None and supervisor.is_running:
            await supervisor.settle()


class Probe:
    """Makes child specs whose starts and stops are recorded in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Hashable]] = []
        self.controls: dict[Hashable, Control] = {}
        self.fail_start: set[Hashable] = set()
        self._changed = anyio.Event()

    async def wait_starts(self, child_id: Hashable, count: int) -> None:
        """Wait until the child has been started ``count`` times (bounded by a timeout)."""
        with anyio.fail_after(5):
            while self.starts(child_id) < count:
                await self._changed.wait()

    def spec(self, child_id: Hashable, **fields: Any) -> ChildSpec:
        return ChildSpec(child_id, self.child, args=(child_id,), **fields)

    def starts(self, child_id: Hashable) -> int:
        return self.events.count(("start", child_id))

    def clear(self) -> None:
        self.events.clear()

    async def child(self, child_id: Hashable, *, task_status: anyio.abc.TaskStatus[Control]) -> None:
        if child_id in self.fail_start:
            raise RuntimeError(f"{child_id} cannot start")
        control = Control(child_id)
        self.controls[child_id] = control
        self.events.append(("start", child_id))
        self._changed.set()
        self._changed = anyio.Event()
        try:
            task_status.started(control)
            await control.go.wait()
            if control.command == "crash":
                raise RuntimeError(f"{child_id} crashed")
            if control.command == "shutdown":
                raise Shutdown()
        finally:
            self.events.append(("stop", child_id))
            control.exited.set()
