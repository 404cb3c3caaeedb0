"""Unit tests of the supervisor: strategies, restart types, intensity, shutdown, dynamic API."""

from __future__ import annotations

import logging
import math

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from pywsserver.supervision import (
    BRUTAL_KILL,
    INFINITY,
    ChildAlreadyPresent,
    ChildAlreadyStarted,
    ChildCounts,
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    ChildStartError,
    NotRunning,
    Restart,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
    SupervisorError,
    cleanup_scope,
    whereis,
)

from .supervision_helpers import Probe

pytestmark = pytest.mark.anyio


def running_ids(supervisor: Supervisor) -> list[object]:
    return [c.id for c in supervisor.which_children() if c.running]


async def test_run_returns_ready_only_after_every_child_started_in_order() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a"), probe.spec("b"), probe.spec("c")]).running() as sup:
        assert probe.events == [("start", "a"), ("start", "b"), ("start", "c")]
        assert running_ids(sup) == ["a", "b", "c"]
        assert [c.ref.child_id for c in sup.which_children()] == ["a", "b", "c"]
    assert probe.events[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_one_for_one_restarts_only_the_crashed_child() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a"), probe.spec("b"), probe.spec("c")], intensity=5).running() as sup:
        probe.clear()
        await probe.controls["b"].end("crash", sup)
        assert probe.events == [("stop", "b"), ("start", "b")]
        assert running_ids(sup) == ["a", "b", "c"]
        assert sup.restart_count == 1


async def test_one_for_all_stops_others_in_reverse_then_restarts_all_in_order() -> None:
    probe = Probe()
    specs = [probe.spec("a"), probe.spec("b"), probe.spec("c"), probe.spec("d")]
    async with Supervisor(specs, strategy="one_for_all", intensity=5).running() as sup:
        probe.clear()
        await probe.controls["b"].end("crash", sup)
        assert probe.events == [
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert sup.restart_count == 1


async def test_rest_for_one_restarts_the_crashed_child_and_those_started_after_it() -> None:
    probe = Probe()
    specs = [probe.spec("a"), probe.spec("b"), probe.spec("c"), probe.spec("d")]
    async with Supervisor(specs, strategy=Strategy.REST_FOR_ONE, intensity=5).running() as sup:
        probe.clear()
        await probe.controls["b"].end("crash", sup)
        assert probe.events == [
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert running_ids(sup) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("restart", "how", "restarted", "kept"),
    [
        ("permanent", "exit", True, True),
        ("permanent", "crash", True, True),
        ("permanent", "shutdown", True, True),
        ("transient", "exit", False, True),
        ("transient", "shutdown", False, True),
        ("transient", "crash", True, True),
        ("temporary", "exit", False, False),
        ("temporary", "crash", False, False),
    ],
)
async def test_restart_types_follow_otp(restart: str, how: str, restarted: bool, kept: bool) -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a", restart=restart)], intensity=5).running() as sup:
        await probe.controls["a"].end(how, sup)
        assert probe.starts("a") == (2 if restarted else 1)
        assert [c.id for c in sup.which_children()] == (["a"] if kept else [])
        assert running_ids(sup) == (["a"] if restarted else [])


async def test_temporary_sibling_stopped_by_one_for_all_is_not_restarted_and_forgotten() -> None:
    probe = Probe()
    specs = [probe.spec("a"), probe.spec("tmp", restart="temporary"), probe.spec("c")]
    async with Supervisor(specs, strategy="one_for_all", intensity=5).running() as sup:
        await probe.controls["a"].end("crash", sup)
        assert probe.starts("tmp") == 1
        assert [c.id for c in sup.which_children()] == ["a", "c"]
        assert running_ids(sup) == ["a", "c"]


async def test_exceeding_intensity_stops_all_children_in_reverse_and_raises() -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a"), probe.spec("b"), probe.spec("c")], intensity=2, period=60)
    with pytest.raises(RestartIntensityExceeded) as caught:
        async with sup.running():
            for _ in range(2):
                await probe.controls["b"].end("crash", sup)
            assert sup.restart_count == 2
            probe.clear()
            await probe.controls["b"].end("crash")
            await anyio.sleep_forever()
    assert caught.value.child_id == "b"
    assert isinstance(caught.value.reason, RuntimeError)
    assert probe.events == [("stop", "b"), ("stop", "c"), ("stop", "a")]
    assert not sup.is_running


async def test_intensity_zero_gives_up_on_the_first_restart() -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=0)
    with pytest.RaisesGroup(RestartIntensityExceeded):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            await probe.controls["a"].end("crash")
    assert probe.starts("a") == 1


async def test_restarts_older_than_the_period_no_longer_count() -> None:
    now = [0.0]
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=1, period=5, clock=lambda: now[0])
    with pytest.raises(RestartIntensityExceeded):
        async with sup.running():
            await probe.controls["a"].end("crash", sup)
            now[0] = 5.0  # the first restart leaves the window
            await probe.controls["a"].end("crash", sup)
            assert sup.restart_count == 2
            now[0] = 9.9  # the second is still inside it
            await probe.controls["a"].end("crash")
            await anyio.sleep_forever()
    assert sup.restart_count == 2


async def test_only_real_restarts_count_against_intensity() -> None:
    probe = Probe()
    specs = [probe.spec("t", restart="transient"), probe.spec("tmp", restart="temporary")]
    async with Supervisor(specs, intensity=0).running() as sup:
        await probe.controls["t"].end("exit", sup)
        await probe.controls["tmp"].end("crash", sup)
        await sup.restart_child("t")
        await sup.terminate_child("t")
        assert sup.is_running
        assert sup.restart_count == 0


async def test_a_child_supervisor_that_gives_up_is_restarted_by_its_parent() -> None:
    probe = Probe()
    inner = Supervisor([probe.spec("leaf")], intensity=0, name="inner-escalation")
    outer = Supervisor([inner.child_spec("inner")], intensity=3)
    async with outer.running():
        first = probe.controls["leaf"]
        await first.end("crash")
        await probe.wait_starts("leaf", 2)
        await outer.settle()
        assert probe.starts("leaf") == 2  # the parent restarted the inner supervisor, which started leaf again
        assert outer.restart_count == 1
        assert inner.is_running
        assert whereis("inner-escalation") is inner


async def test_escalation_reaches_the_top_when_every_level_gives_up() -> None:
    probe = Probe()
    inner = Supervisor([probe.spec("leaf")], intensity=0)
    outer = Supervisor([inner.child_spec("inner")], intensity=0, name="outer-top")
    with pytest.raises(RestartIntensityExceeded) as caught:
        async with outer.running():
            await probe.controls["leaf"].end("crash")
            await anyio.sleep_forever()
    assert caught.value.child_id == "inner"
    assert isinstance(caught.value.reason, RestartIntensityExceeded)
    assert whereis("outer-top") is None


async def test_a_child_failing_to_start_fails_the_start_and_stops_started_siblings() -> None:
    probe = Probe()
    probe.fail_start.add("c")
    sup = Supervisor([probe.spec("a"), probe.spec("b"), probe.spec("c"), probe.spec("d")])
    with pytest.raises(ChildStartError) as caught:
        async with sup.running():
            pytest.fail("the supervisor must not report ready")
    assert caught.value.child_id == "c"
    assert probe.events == [("start", "a"), ("start", "b"), ("stop", "b"), ("stop", "a")]


async def test_a_child_returning_without_started_is_a_start_error() -> None:
    async def forgetful(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        return None

    with pytest.raises(ChildStartError, match=r"without calling task_status\.started"):
        async with Supervisor([ChildSpec("f", forgetful)]).running():
            pass


async def test_shutdown_timeout_lets_cleanup_run_then_cancels_it_at_the_deadline() -> None:
    log: list[str] = []

    async def slow_cleanup(wanted: float, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with cleanup_scope() as scope:
                log.append("cleanup started")
                await anyio.sleep(wanted)
                log.append("cleanup finished")
            if scope.cancelled_caught:
                log.append("cleanup cut short")

    specs = [
        ChildSpec("quick", slow_cleanup, args=(0.0,), shutdown=5),
        ChildSpec("stuck", slow_cleanup, args=(math.inf,), shutdown=0.05),
    ]
    async with Supervisor(specs).running():
        pass
    assert log == ["cleanup started", "cleanup cut short", "cleanup started", "cleanup finished"]


async def test_brutal_kill_leaves_no_time_for_cleanup_and_infinity_waits() -> None:
    log: list[str] = []
    release = anyio.Event()

    async def child(name: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with cleanup_scope():
                if name == "patient":
                    release.set()
                await anyio.lowlevel.checkpoint()
                log.append(f"{name} cleaned up")

    async def releaser(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with cleanup_scope():
                await release.wait()
                log.append("releaser saw patient first")

    specs = [
        ChildSpec("releaser", releaser, shutdown=INFINITY),
        ChildSpec("patient", child, args=("patient",), shutdown=INFINITY),
        ChildSpec("brutal", child, args=("brutal",), shutdown=BRUTAL_KILL),
    ]
    async with Supervisor(specs).running():
        pass
    assert log == ["patient cleaned up", "releaser saw patient first"]


async def test_dynamic_api_start_terminate_restart_delete_with_clear_errors() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a")]).running() as sup:
        ref = await sup.start_child(probe.spec("b"))
        assert ref is probe.controls["b"]
        assert running_ids(sup) == ["a", "b"]
        with pytest.raises(ChildAlreadyStarted):
            await sup.start_child(probe.spec("b"))
        await sup.terminate_child("b")
        assert [(c.id, c.running) for c in sup.which_children()] == [("a", True), ("b", False)]
        with pytest.raises(ChildAlreadyPresent):
            await sup.start_child(probe.spec("b"))
        assert sup.count_children() == ChildCounts(specs=2, active=1, supervisors=0, workers=2)
        await sup.restart_child("b")
        with pytest.raises(ChildRunning):
            await sup.restart_child("b")
        with pytest.raises(ChildRunning):
            await sup.delete_child("b")
        await sup.terminate_child("b")
        await sup.delete_child("b")
        assert [c.id for c in sup.which_children()] == ["a"]
        for call in (sup.terminate_child, sup.restart_child, sup.delete_child):
            with pytest.raises(ChildNotFound):
                await call("nope")
        probe.fail_start.add("bad")
        with pytest.raises(ChildStartError):
            await sup.start_child(probe.spec("bad"))
        assert [c.id for c in sup.which_children()] == ["a"]
    with pytest.raises(NotRunning):
        await sup.start_child(probe.spec("late"))


async def test_terminating_a_temporary_child_forgets_its_spec() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("t", restart="temporary")]).running() as sup:
        await sup.terminate_child("t")
        assert sup.which_children() == []


async def test_dynamic_children_are_stopped_before_static_ones() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a")]).running() as sup:
        await sup.start_child(probe.spec("b"))
    assert probe.events[-2:] == [("stop", "b"), ("stop", "a")]


async def test_simple_one_for_one_starts_many_children_of_one_template() -> None:
    probe = Probe()
    template = ChildSpec("conn", probe.child, restart="transient")
    async with Supervisor([template], strategy="simple_one_for_one", intensity=5).running() as sup:
        assert sup.which_children() == []
        handles = [await sup.start_child(f"c{i}") for i in range(3)]
        assert [h.ref for h in handles] == [probe.controls[f"c{i}"] for i in range(3)]
        assert sup.count_children().active == 3
        await sup.terminate_child(handles[0])
        assert [c.id for c in sup.which_children()] == handles[1:]
        await probe.controls["c1"].end("crash", sup)  # transient + crash: restarted with its args
        assert probe.starts("c1") == 2
        await probe.controls["c2"].end("exit", sup)  # transient + normal: gone
        assert [c.ref.child_id for c in sup.which_children()] == ["c1"]
        with pytest.raises(SupervisorError):
            await sup.restart_child(handles[1])
        with pytest.raises(SupervisorError):
            await sup.delete_child(handles[1])
        with pytest.raises(SupervisorError):
            await sup.terminate_child(object())
    assert probe.events[-1] == ("stop", "c1")


async def test_start_child_soon_starts_a_dynamic_child_without_waiting_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    probe.fail_start.add("broken")
    template = ChildSpec("conn", probe.child, restart="temporary")
    async with Supervisor([template], strategy="simple_one_for_one", intensity=5).running() as sup:
        sup.start_child_soon("c0")
        assert probe.starts("c0") == 0  # not started yet: the caller has not yielded
        assert sup.count_children().active == 1  # but counted, so a stop waits for it
        await probe.wait_starts("c0", 1)
        assert [c.ref for c in sup.which_children()] == [probe.controls["c0"]]
        with caplog.at_level(logging.ERROR, logger="pywsserver.supervision"):
            sup.start_child_soon("broken")
            await sup.settle()
            await anyio.wait_all_tasks_blocked()
        assert "failed to start" in caplog.text and "broken cannot start" in caplog.text
        assert [c.ref.child_id for c in sup.which_children()] == ["c0"]  # the failed start is forgotten
        await probe.controls["c0"].end("crash", sup)  # temporary: reported, not restarted
        assert sup.which_children() == [] and sup.restart_count == 0
        assert "crashed" in caplog.text
        sup.start_child_soon("c1")
    assert probe.events[-2:] == [("start", "c1"), ("stop", "c1")]  # the stop waited for a child still starting
    with pytest.raises(NotRunning):
        sup.start_child_soon("late")


async def test_a_dynamic_child_stopped_before_it_was_ready_is_no_failed_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered = anyio.Event()

    async def never_ready(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return  # ends quietly when stopped, never having called started()

    template = ChildSpec("slow", never_ready, restart="temporary", shutdown=1)
    with caplog.at_level(logging.ERROR, logger="pywsserver.supervision"):
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            sup.start_child_soon()
            await entered.wait()
            await sup.terminate_child(sup.which_children()[0].id)
            assert sup.which_children() == []
    assert "failed to start" not in caplog.text


async def test_start_child_soon_is_only_for_dynamic_supervisors() -> None:
    probe = Probe()
    async with Supervisor([probe.spec("a")]).running() as sup:
        with pytest.raises(SupervisorError, match="simple_one_for_one"):
            sup.start_child_soon(probe.spec("b"))


async def test_any_significant_child_ending_shuts_the_supervisor_down() -> None:
    probe = Probe()
    specs = [probe.spec("a"), probe.spec("s", restart="transient", significant=True)]
    sup = Supervisor(specs, auto_shutdown="any_significant")
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await probe.controls["s"].end("exit")
    assert not sup.is_running
    assert probe.events[-1] == ("stop", "a")


async def test_all_significant_waits_for_every_significant_child() -> None:
    probe = Probe()
    specs = [
        probe.spec("s1", restart="temporary", significant=True),
        probe.spec("s2", restart="temporary", significant=True),
    ]
    sup = Supervisor(specs, auto_shutdown="all_significant")
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        await probe.controls["s1"].end("exit", sup)
        assert sup.is_running
        await probe.controls["s2"].end("crash")
    assert not sup.is_running


async def test_terminating_a_significant_child_does_not_shut_down() -> None:
    probe = Probe()
    specs = [probe.spec("s", restart="transient", significant=True)]
    async with Supervisor(specs, auto_shutdown="any_significant").running() as sup:
        await sup.terminate_child("s")
        assert sup.is_running


async def test_nothing_a_supervisor_started_outlives_it() -> None:
    alive: set[str] = set()

    async def spawner(name: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async def grandchild(i: int) -> None:
            alive.add(f"{name}/{i}")
            try:
                await anyio.sleep_forever()
            finally:
                alive.discard(f"{name}/{i}")

        alive.add(name)
        try:
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(grandchild, i)
                task_status.started()
        finally:
            alive.discard(name)

    inner = Supervisor([ChildSpec("x", spawner, args=("x",))])
    sup = Supervisor([ChildSpec("y", spawner, args=("y",)), inner.child_spec("inner")])
    async with sup.running():
        await anyio.lowlevel.checkpoint()
        assert len(alive) == 8
        await sup.start_child(ChildSpec("z", spawner, args=("z",)))
    assert alive == set()


async def test_cancelling_the_supervisor_still_stops_children_in_reverse_order() -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a"), probe.spec("b"), probe.spec("c")])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        probe.clear()
        tg.cancel_scope.cancel()
    assert probe.events == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_crashes_and_restarts_are_reported_and_normal_exits_are_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    caplog.set_level(logging.DEBUG, logger="pywsserver.supervision")
    async with Supervisor([probe.spec("w"), probe.spec("q")], name="reporting", intensity=5).running() as sup:
        await probe.controls["w"].end("crash", sup)
        crash = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(crash) == 1
        assert "'w'" in crash[0].getMessage() and "'reporting'" in crash[0].getMessage()
        assert crash[0].exc_info is not None and "w crashed" in str(crash[0].exc_info[1])
        assert any(r.levelno == logging.INFO and "restarted 'w'" in r.getMessage() for r in caplog.records)
        caplog.clear()
        await probe.controls["q"].end("exit", sup)
        assert [r for r in caplog.records if r.levelno >= logging.INFO and "'q'" in r.getMessage()] == [
            r for r in caplog.records if "restarted 'q'" in r.getMessage()
        ]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_registered_supervisor_is_found_by_name_while_it_runs() -> None:
    sup = Supervisor([], name="registered-sup")
    async with sup.running():
        assert whereis("registered-sup") is sup
    assert whereis("registered-sup") is None


def test_invalid_child_specs_fail_at_construction_naming_child_and_field() -> None:
    async def start(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()

    with pytest.raises(ValueError, match=r"child spec 'x'.*'restart'.*'forever'"):
        ChildSpec("x", start, restart="forever")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"child spec 'x'.*'significant'"):
        ChildSpec("x", start, significant=True)
    with pytest.raises(ValueError, match=r"child spec 'x'.*'shutdown'"):
        ChildSpec("x", start, shutdown=-1)
    with pytest.raises(ValueError, match=r"child spec 'x'.*'shutdown'"):
        ChildSpec("x", start, shutdown="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"child spec 'x'.*'type'"):
        ChildSpec("x", start, type="thread")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"child spec 'x'.*'start'"):
        ChildSpec("x", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"duplicate child id 'x'"):
        Supervisor([ChildSpec("x", start), ChildSpec("x", start)])
    with pytest.raises(ValueError, match="strategy"):
        Supervisor([], strategy="one_for_some")
    with pytest.raises(ValueError, match="intensity"):
        Supervisor([], intensity=-1)
    with pytest.raises(ValueError, match="exactly one"):
        Supervisor([], strategy="simple_one_for_one")


def test_child_specs_are_plain_comparable_data() -> None:
    async def start(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()

    spec = ChildSpec("x", start, restart="transient")
    assert spec == ChildSpec("x", start, restart=Restart.TRANSIENT)
    assert spec.shutdown == 5.0
    assert "restart=<Restart.TRANSIENT" in repr(spec)
    assert Supervisor([]).child_spec("s").shutdown == INFINITY
