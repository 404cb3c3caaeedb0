"""The supervisor checked against the text of OTP's supervisor(3), one documented behaviour per test.

Each test quotes the sentence of the Erlang/OTP documentation (or the
behaviour of its ``supervisor`` module) it checks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import pytest

from pywsserver.supervision import (
    BRUTAL_KILL,
    INFINITY,
    ChildCounts,
    ChildHandle,
    ChildNotFound,
    ChildRestarting,
    ChildSpec,
    ChildState,
    ChildType,
    RestartIntensityExceeded,
    Shutdown,
    SimpleOneForOneError,
    Supervisor,
    cleanup_scope,
)

from .supervision_helpers import Probe

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def unhang(release: Callable[[], None], seconds: float = 20) -> AsyncIterator[list[bool]]:
    """Bound a block that a supervisor bug would hang: after ``seconds`` call ``release``, so it fails instead.

    The list yielded gets an item when that happened (assert it stays empty).
    """
    fired: list[bool] = []

    async def watchdog() -> None:
        await anyio.sleep(seconds)
        fired.append(True)
        release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog)
        yield fired
        tg.cancel_scope.cancel()


# --------------------------------------------------------------- 1. giving up


@pytest.mark.parametrize(
    ("restart", "restarted", "kept"),
    [("permanent", True, True), ("transient", False, True), ("temporary", False, False)],
)
async def test_a_supervisor_that_gives_up_exits_with_reason_shutdown(restart: str, restarted: bool, kept: bool) -> None:
    """supervisor(3): "if more than MaxR restarts occur within MaxT seconds, the supervisor terminates all
    the child processes and then itself. The termination reason for the supervisor itself in that case
    will be shutdown." A transient (or temporary) parent spec therefore does not restart it; a permanent
    one does.
    """
    probe = Probe()
    inner = Supervisor([probe.spec("leaf")], intensity=0)
    ended: list[BaseException | None] = []
    inner_ended = anyio.Event()

    async def run_inner(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
        try:
            await inner.run(task_status=task_status)
        except BaseException as error:
            ended.append(error)
            raise
        finally:
            inner_ended.set()

    spec = ChildSpec("inner", run_inner, restart=restart, type=ChildType.SUPERVISOR)
    async with Supervisor([spec], intensity=3).running() as outer:
        await probe.controls["leaf"].end("crash")
        with anyio.fail_after(5):
            await inner_ended.wait()
        await outer.settle()
        assert isinstance(ended[0], RestartIntensityExceeded) and isinstance(ended[0], Shutdown)
        assert outer.restart_count == (1 if restarted else 0)
        assert probe.starts("leaf") == (2 if restarted else 1)
        assert [(c.id, c.running) for c in outer.which_children()] == ([("inner", restarted)] if kept else [])
        assert outer.is_running


async def test_the_top_of_a_tree_that_gives_up_still_tells_its_caller(caplog: pytest.LogCaptureFixture) -> None:
    """The caller of the top supervisor's run() learns that the tree gave up (OTP: the supervisor exits
    with shutdown and its start_link caller's link reports it); the parent of a child supervisor that gave
    up logs no crash of it, since shutdown is not a crash."""
    probe = Probe()
    inner = Supervisor([probe.spec("leaf")], intensity=0, name="gives-up")
    outer = Supervisor([inner.child_spec("inner", restart="transient")], intensity=0, name="parent")
    caplog.set_level(logging.ERROR, logger="pywsserver.supervision")
    async with outer.running():
        await probe.controls["leaf"].end("crash")
        with anyio.fail_after(5):
            while [c.state for c in await outer.children()] != [ChildState.NOT_RUNNING]:
                await anyio.wait_all_tasks_blocked()
    assert not [r for r in caplog.records if "'inner'" in r.getMessage() and "crashed" in r.getMessage()]
    with pytest.raises(RestartIntensityExceeded):
        async with inner.running():
            await probe.controls["leaf"].end("crash")
            await anyio.sleep_forever()


# ---------------------------------------------------------- 2. restarting


class FlakyStart:
    """A child whose starts after the first wait for a gate and then fail or succeed as told."""

    def __init__(self) -> None:
        self.attempts = 0
        self.fail = True
        self.attempting = anyio.Event()
        self.gate = anyio.Event()
        self.crash = anyio.Event()

    async def start(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        self.attempts += 1
        if self.attempts > 1:
            self.attempting.set()
            await self.gate.wait()
            if self.fail:
                raise RuntimeError(f"attempt {self.attempts} failed")
        task_status.started(self.attempts)
        await self.crash.wait()
        self.crash = anyio.Event()
        raise RuntimeError("crashed")


async def test_a_failed_restart_marks_the_child_restarting_and_serves_calls_between_attempts() -> None:
    """supervisor(3) which_children: Child is "the PID of the corresponding child process, the atom
    restarting if the process is about to be restarted, or undefined if there is no such process";
    restart_child and delete_child return {error, restarting} for such a child; the retry goes through
    the supervisor's own mailbox (try_again_restart), so calls are served between attempts, and each
    attempt counts toward the restart intensity. terminate_child of a restarting child stops it for good.
    """
    flaky = FlakyStart()
    answers: dict[str, Any] = {}

    async def ask(name: str, call: Any) -> None:
        try:
            answers[name] = await call
        except Exception as error:
            answers[name] = error

    async with (
        unhang(flaky.gate.set) as fired,
        Supervisor([ChildSpec("a", flaky.start)], intensity=5, period=60).running() as sup,
    ):
        flaky.crash.set()
        with anyio.fail_after(5):
            await flaky.attempting.wait()  # the first restart attempt is under way, the loop is busy
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "restart", sup.restart_child("a"))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ask, "delete", sup.delete_child("a"))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ask, "children", sup.children())
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ask, "terminate", sup.terminate_child("a"))
            await anyio.wait_all_tasks_blocked()
            flaky.gate.set()  # attempt 2 fails: the child is now restarting and the calls are answered
        assert isinstance(answers["restart"], ChildRestarting)
        assert isinstance(answers["delete"], ChildRestarting)
        assert [(c.id, c.state, c.running) for c in answers["children"]] == [("a", ChildState.RESTARTING, False)]
        assert answers["terminate"] is None
        await sup.settle()
        assert flaky.attempts == 2  # terminated while restarting: no more attempts
        assert sup.restart_count == 1
        assert [(c.id, c.state) for c in await sup.children()] == [("a", ChildState.NOT_RUNNING)]
        flaky.fail = False
        assert await sup.restart_child("a") == 3
    assert not fired


async def test_a_dynamic_child_not_yet_ready_shows_as_starting_not_running() -> None:
    """A child is running once it is started (OTP's start_child returns after init); one started with
    start_child_soon that has not called started() yet is starting, with no ref."""
    gate = anyio.Event()

    async def slow(*, task_status: anyio.abc.TaskStatus[str]) -> None:
        await gate.wait()
        task_status.started("ready")
        await anyio.sleep_forever()

    async with Supervisor([ChildSpec("t", slow, restart="temporary")], strategy="simple_one_for_one").running() as sup:
        handle = sup.start_child_soon()
        await anyio.wait_all_tasks_blocked()
        assert [(c.state, c.running, c.ref) for c in sup.which_children()] == [(ChildState.STARTING, False, None)]
        assert sup.count_children().active == 1
        gate.set()
        await anyio.wait_all_tasks_blocked()
        assert [(c.id, c.state, c.ref) for c in sup.which_children()] == [(handle, ChildState.RUNNING, "ready")]


# ------------------------------------------------------- 3. introspection


async def test_which_children_as_a_call_is_ordered_after_exits_already_queued() -> None:
    """supervisor(3): which_children and count_children are calls to the supervisor, answered in the
    order of its mailbox: an exit that reached the supervisor before the call is handled (and the child
    restarted) before the answer."""
    probe = Probe()
    async with Supervisor([probe.spec("a"), probe.spec("b")], intensity=5).running() as sup:
        first = probe.controls["a"]
        first.command = "crash"
        first.go.set()
        await first.exited.wait()  # its exit is in the mailbox, not handled yet
        rows = await sup.children()
        assert [(c.id, c.running) for c in rows] == [("a", True), ("b", True)]
        assert rows[0].ref is probe.controls["a"] and rows[0].ref is not first  # the restarted child
        assert await sup.counts() == ChildCounts(specs=2, active=2, supervisors=0, workers=2)
        await sup.terminate_child("b")
        assert (await sup.counts()).active == 1


# --------------------------------------------------- 4. simple_one_for_one


async def test_simple_one_for_one_counts_one_spec_and_refuses_restart_and_delete() -> None:
    """supervisor(3) count_children: specs is "the total count of children, dead or alive"; OTP's
    simple_one_for_one supervisor answers specs = 1 (its one template) however many children run.
    restart_child and delete_child "are invalid for simple_one_for_one supervisors": {error, simple_one_for_one}.
    """
    probe = Probe()
    template = ChildSpec("conn", probe.child, restart="temporary")
    async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
        handles = [await sup.start_child(f"c{i}") for i in range(3)]
        assert sup.count_children() == ChildCounts(specs=1, active=3, supervisors=0, workers=3)
        assert await sup.counts() == ChildCounts(specs=1, active=3, supervisors=0, workers=3)
        for call in (sup.restart_child, sup.delete_child):
            with pytest.raises(SimpleOneForOneError):
                await call(handles[0])
        with pytest.raises(SimpleOneForOneError):
            await sup.terminate_child("conn")  # an id instead of a pid: {error, simple_one_for_one}


async def test_terminating_a_dynamic_child_that_has_already_exited_succeeds_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """supervisor(3) terminate_child: "If the specified process is alive, but is not a child of the
    specified supervisor, the function returns {error,not_found}"; for a pid that is no longer alive OTP's
    supervisor answers ok."""
    probe = Probe()
    template = ChildSpec("conn", probe.child, restart="transient")
    caplog.set_level(logging.WARNING, logger="pywsserver.supervision")
    async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
        gone = await sup.start_child("gone")
        await probe.controls["gone"].end("exit", sup)
        assert sup.which_children() == []
        await sup.terminate_child(gone)  # no error, nothing logged
        await sup.terminate_child(gone)
        async with Supervisor([template], strategy="simple_one_for_one").running() as other:
            foreign = await other.start_child("foreign")
            with pytest.raises(ChildNotFound):
                await sup.terminate_child(foreign)
    assert not caplog.records


# ------------------------------------------------------ 5. dynamic identity


async def test_dynamic_children_are_named_by_their_handle_not_by_what_they_report() -> None:
    """supervisor(3) start_child: for a simple_one_for_one supervisor it returns {ok, Child} where Child is
    the pid of that child, and terminate_child(SupRef, Pid) stops that one process. Two children that
    report equal (or None) refs are still two children."""
    stopped: list[int] = []

    async def same(n: int, *, task_status: anyio.abc.TaskStatus[Any]) -> None:
        task_status.started(None if n < 2 else ("same", "ref"))
        try:
            await anyio.sleep_forever()
        finally:
            stopped.append(n)

    async with Supervisor([ChildSpec("t", same)], strategy="simple_one_for_one").running() as sup:
        handles = [await sup.start_child(n) for n in range(4)]
        assert all(isinstance(h, ChildHandle) for h in handles) and len(set(map(id, handles))) == 4
        assert [h.ref for h in handles] == [None, None, ("same", "ref"), ("same", "ref")]
        await sup.terminate_child(handles[1])
        await sup.terminate_child(handles[3])
        assert stopped == [1, 3]
        assert [c.id for c in sup.which_children()] == [handles[0], handles[2]]
        with pytest.raises(SimpleOneForOneError):
            await sup.terminate_child(None)
        with pytest.raises(SimpleOneForOneError):
            await sup.terminate_child(("same", "ref"))
        assert stopped == [1, 3]


# ------------------------------------------------------------ 6. shutdown


async def test_a_top_supervisor_waits_for_an_infinity_child_however_long_then_stops_the_next() -> None:
    """supervisor(3) shutdown: "If the child process is another supervisor, the shutdown time must be set
    to infinity to give the subtree ample time to shut down"; with infinity the supervisor waits for the
    child to terminate, then terminates the next one in reverse start order. No deadline of its own:
    the cleanup below outlasts 5 s (a former hidden limit at the top of a tree)."""
    probe = Probe()

    async def patient(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with cleanup_scope():
                await anyio.sleep(5.5)
                probe.events.append(("cleaned up", "patient"))

    sup = Supervisor([probe.spec("first", shutdown=1), ChildSpec("patient", patient, shutdown=INFINITY)])
    async with unhang(lambda: probe.controls["first"].go.set()) as fired, sup.running():
        pass
    assert not fired
    assert probe.events == [("start", "first"), ("cleaned up", "patient"), ("stop", "first")]


async def test_a_child_that_ignores_cancellation_is_reported_and_the_next_child_is_still_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """supervisor(3) shutdown: "the supervisor tells the child process to terminate ... If the child process
    does not terminate within that time it is unconditionally terminated" and the next child is stopped.
    Python cannot end a task that ignores cancellation: the supervisor reports it and goes on; run()
    returns once that task ends."""
    probe = Probe()
    release = anyio.Event()
    order: list[str] = []

    async def stubborn(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # ignores its shutdown time
                await release.wait()
                order.append("stubborn ended")

    async def watch_first() -> None:
        await probe.controls["first"].exited.wait()
        order.append("first stopped")
        release.set()

    caplog.set_level(logging.ERROR, logger="pywsserver.supervision")
    sup = Supervisor([probe.spec("first"), ChildSpec("stubborn", stubborn, shutdown=BRUTAL_KILL)])
    def free_both() -> None:
        release.set()
        probe.controls["first"].go.set()

    async with unhang(free_both) as fired, anyio.create_task_group() as tg:
        await tg.start(sup.run)
        tg.start_soon(watch_first)
        await sup.stop()
    assert not fired
    assert order == ["first stopped", "stubborn ended"]
    assert any("'stubborn'" in r.getMessage() and "did not stop" in r.getMessage() for r in caplog.records)


async def test_a_child_supervisor_whose_own_shutdown_time_runs_out_ends_its_whole_subtree() -> None:
    """supervisor(3): a supervisor child with a shutdown time is killed when that time is up, and its
    children with it: each child's own shutdown governs, at every level (the inner infinity child
    cannot outlive its supervisor's 0.2 s)."""
    log: list[str] = []
    never = anyio.Event()

    async def endless_cleanup(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with cleanup_scope() as scope:
                await never.wait()
            log.append("cleanup cut short" if scope.cancelled_caught else "cleanup finished")

    inner = Supervisor([ChildSpec("leaf", endless_cleanup, shutdown=INFINITY)])
    outer = Supervisor([inner.child_spec("inner", shutdown=0.2)])
    async with unhang(never.set) as fired, outer.running():
        pass
    assert not fired
    assert log == ["cleanup cut short"]
