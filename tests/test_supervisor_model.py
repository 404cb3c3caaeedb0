"""A hypothesis state machine checks the supervisor against a small model of the OTP rules.

Random sequences of child crashes, normal exits, ``shutdown`` exits, dynamic
calls and clock jumps run against a live supervisor (in an event loop on a
portal thread, on each backend). After every step the children running, the
specs kept, the starts per child, the restart count and whether the
supervisor escalated must match what the model predicts.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from typing import Any

import anyio.from_thread
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pywsserver.supervision import (
    ChildNotFound,
    ChildRunning,
    NotRunning,
    RestartIntensityExceeded,
    Supervisor,
)

from .supervision_helpers import Probe

RESTARTS = ["permanent", "transient", "temporary"]
STRATEGIES = ["one_for_one", "one_for_all", "rest_for_one"]


class Model:
    """What OTP says the supervisor should look like."""

    def __init__(self, strategy: str, restarts: list[str], intensity: int, period: float) -> None:
        self.strategy = strategy
        self.restart = restarts
        self.intensity = intensity
        self.period = period
        n = len(restarts)
        self.present = [True] * n
        self.running = [True] * n
        self.starts = [1] * n
        self.times: list[float] = []
        self.restart_count = 0
        self.escalated = False

    def child_ended(self, i: int, abnormal: bool, now: float) -> None:
        self.running[i] = False
        kind = self.restart[i]
        if not (kind == "permanent" or (kind == "transient" and abnormal)):
            if kind == "temporary":
                self.present[i] = False
            return
        self.times.append(now)
        self.times = [t for t in self.times if now - t < self.period]
        if len(self.times) > self.intensity:
            self.escalated = True
            self.running = [False] * len(self.running)
            return
        self.restart_count += 1
        group = [i]
        if self.strategy != "one_for_one":
            others = range(len(self.restart)) if self.strategy == "one_for_all" else range(i + 1, len(self.restart))
            for j in others:
                if j == i or not self.present[j] or not self.running[j]:
                    continue
                self.running[j] = False
                if self.restart[j] == "temporary":
                    self.present[j] = False
                else:
                    group.append(j)
        for j in group:
            self.running[j] = True
            self.starts[j] += 1


class SupervisorMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.now = 0.0

    @initialize(
        strategy=st.sampled_from(STRATEGIES),
        restarts=st.lists(st.sampled_from(RESTARTS), min_size=1, max_size=5),
        intensity=st.integers(0, 4),
        period=st.sampled_from([1.0, 5.0]),
    )
    def start(self, strategy: str, restarts: list[str], intensity: int, period: float) -> None:
        self.portal = self.stack.enter_context(anyio.from_thread.start_blocking_portal(self.backend))
        self.probe = Probe()
        self.ids = [f"c{i}" for i in range(len(restarts))]
        specs = [self.probe.spec(cid, restart=kind) for cid, kind in zip(self.ids, restarts, strict=True)]
        self.model = Model(strategy, restarts, intensity, period)
        self.sup = Supervisor(specs, strategy=strategy, intensity=intensity, period=period, clock=lambda: self.now)
        future: Future[Any]
        future, _ = self.portal.start_task(self.sup.run)
        self.future = future

    def teardown(self) -> None:
        if hasattr(self, "sup"):
            self.portal.call(self.sup.stop)
            with contextlib.suppress(RestartIntensityExceeded):
                self.future.result(timeout=10)
        self.stack.close()

    def settle(self) -> None:
        with contextlib.suppress(NotRunning):
            self.portal.call(self.sup.settle)

    def end(self, i: int, how: str) -> None:
        if i >= len(self.ids) or not self.model.running[i]:
            return
        self.portal.call(self.probe.controls[self.ids[i]].end, how)
        self.settle()
        self.model.child_ended(i, abnormal=(how == "crash"), now=self.now)

    @precondition(lambda self: not self.model.escalated)
    @rule(i=st.integers(0, 4))
    def crash(self, i: int) -> None:
        self.end(i, "crash")

    @precondition(lambda self: not self.model.escalated)
    @rule(i=st.integers(0, 4), how=st.sampled_from(["exit", "shutdown"]))
    def exit_normally(self, i: int, how: str) -> None:
        self.end(i, how)

    @precondition(lambda self: not self.model.escalated)
    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 6.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: not self.model.escalated)
    @rule(i=st.integers(0, 4))
    def terminate_child(self, i: int) -> None:
        if i >= len(self.ids):
            return
        if not self.model.present[i]:
            with pytest.raises(ChildNotFound):
                self.portal.call(self.sup.terminate_child, self.ids[i])
            return
        self.portal.call(self.sup.terminate_child, self.ids[i])
        self.model.running[i] = False
        if self.model.restart[i] == "temporary":
            self.model.present[i] = False

    @precondition(lambda self: not self.model.escalated)
    @rule(i=st.integers(0, 4))
    def restart_child(self, i: int) -> None:
        if i >= len(self.ids):
            return
        if not self.model.present[i]:
            with pytest.raises(ChildNotFound):
                self.portal.call(self.sup.restart_child, self.ids[i])
        elif self.model.running[i]:
            with pytest.raises(ChildRunning):
                self.portal.call(self.sup.restart_child, self.ids[i])
        else:
            self.portal.call(self.sup.restart_child, self.ids[i])
            self.model.running[i] = True
            self.model.starts[i] += 1

    @precondition(lambda self: not self.model.escalated)
    @rule(i=st.integers(0, 4))
    def delete_child(self, i: int) -> None:
        if i >= len(self.ids):
            return
        if not self.model.present[i]:
            with pytest.raises(ChildNotFound):
                self.portal.call(self.sup.delete_child, self.ids[i])
        elif self.model.running[i]:
            with pytest.raises(ChildRunning):
                self.portal.call(self.sup.delete_child, self.ids[i])
        else:
            self.portal.call(self.sup.delete_child, self.ids[i])
            self.model.present[i] = False

    @precondition(lambda self: self.model.escalated)
    @rule()
    def stay_stopped(self) -> None:
        """Once escalated nothing else may happen; the invariant keeps checking it."""

    @invariant()
    def matches_the_model(self) -> None:
        if not hasattr(self, "sup"):
            return
        model = self.model
        if model.escalated:
            assert not self.sup.is_running
            with pytest.raises(RestartIntensityExceeded):
                self.future.result(timeout=10)
            for cid in self.ids:  # every start was followed by a stop
                assert self.probe.events.count(("start", cid)) == self.probe.events.count(("stop", cid))
            return
        assert self.sup.is_running
        rows = self.sup.which_children()
        expected = [(cid, model.running[i]) for i, cid in enumerate(self.ids) if model.present[i]]
        assert [(row.id, row.running) for row in rows] == expected
        assert [self.probe.starts(cid) for cid in self.ids] == model.starts
        assert self.sup.restart_count == model.restart_count


class TrioSupervisorMachine(SupervisorMachine):
    backend = "trio"


machine_settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestSupervisorModelAsyncio = SupervisorMachine.TestCase
TestSupervisorModelAsyncio.settings = machine_settings
TestSupervisorModelTrio = TrioSupervisorMachine.TestCase
TestSupervisorModelTrio.settings = machine_settings
