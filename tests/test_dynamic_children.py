"""The children of `Supervisor.start_child_soon` stay owned by their supervisor on both backends.

On asyncio they are tasks of the event loop kept by one task of the supervisor's group
(``pywsserver.supervision._loop_children``), on trio tasks of that group: what a task group
guarantees must hold either way, and look the same from outside.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import anyio
import anyio.abc
import pytest

from pywsserver.supervision import BRUTAL_KILL, ChildSpec, SupervisionError, Supervisor

pytestmark = pytest.mark.anyio

DYNAMIC = "pywsserver.supervision dynamic child"


class Boom(BaseException):
    """What a child lets through: not an ``Exception``, so its run does not take it as a crash."""


class Boom2(BaseException):
    """A second child's error."""


def leaves(error: BaseException) -> list[type[BaseException]]:
    """The kinds of the errors in ``error``, however exception groups nest them."""
    if isinstance(error, BaseExceptionGroup):
        return [kind for inner in error.exceptions for kind in leaves(inner)]
    return [type(error)]


def dynamic_tasks() -> list[anyio.TaskInfo]:
    return [task for task in anyio.get_running_tasks() if task.name == DYNAMIC]


async def test_a_stop_waits_for_every_dynamic_child_and_leaves_no_task_behind() -> None:
    stopped: list[int] = []
    started = 0
    all_started = anyio.Event()

    async def child(number: int, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        nonlocal started
        task_status.started(number)
        started += 1
        if started == 5:
            all_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # cleanup that waits: the stop must wait for it
                stopped.append(number)

    template = ChildSpec("conn", child, restart="temporary", shutdown=5)
    async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
        for number in range(5):
            sup.start_child_soon(number)
        await all_started.wait()
        assert len(dynamic_tasks()) == 5
        assert sup.count_children().active == 5
    assert sorted(stopped) == [0, 1, 2, 3, 4]
    assert dynamic_tasks() == []


async def test_a_dynamic_child_ending_by_itself_is_forgotten_and_its_task_ends() -> None:
    ends = anyio.Event()

    async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await ends.wait()

    template = ChildSpec("conn", child, restart="temporary")
    async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
        sup.start_child_soon()
        await anyio.wait_all_tasks_blocked()
        assert sup.count_children().active == 1
        ends.set()
        await anyio.wait_all_tasks_blocked()
        assert sup.which_children() == []
        assert dynamic_tasks() == []


async def test_a_dynamic_child_that_lets_a_base_exception_through_fails_the_supervisor_after_stopping_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a task of the supervisor's group would: the others are stopped, their cleanup done, and
    the error comes out of the supervisor."""
    others_stopped: list[str] = []
    boom = anyio.Event()

    async def child(kind: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        if kind == "boom":
            await boom.wait()
            raise Boom("let through")
        try:
            await anyio.sleep_forever()
        finally:
            others_stopped.append(kind)

    template = ChildSpec("conn", child, restart="temporary", shutdown=BRUTAL_KILL)
    caplog.set_level(logging.CRITICAL, logger="pywsserver.supervision")
    with pytest.raises((Boom, BaseExceptionGroup)) as caught:
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            sup.start_child_soon("a")
            sup.start_child_soon("boom")
            sup.start_child_soon("b")
            await anyio.wait_all_tasks_blocked()
            boom.set()
            await anyio.sleep_forever()  # cancelled when the supervisor fails
    error = caught.value
    while isinstance(error, BaseExceptionGroup):  # however the groups nest it
        assert len(error.exceptions) == 1
        error = error.exceptions[0]
    assert isinstance(error, Boom)
    assert sorted(others_stopped) == ["a", "b"]
    assert dynamic_tasks() == []


async def test_a_dynamic_child_stopped_before_its_task_began_never_runs_its_start() -> None:
    began: list[str] = []

    async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        began.append("began")
        task_status.started()
        await anyio.sleep_forever()

    template = ChildSpec("conn", child, restart="temporary")
    async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
        handle = sup.start_child_soon()
        await sup.terminate_child(handle)  # asked before the new task took a step
        assert sup.which_children() == []
    assert began in ([], ["began"])  # the request may reach it at its first step or before
    assert dynamic_tasks() == []


async def test_children_started_after_a_restart_of_the_supervisor_are_kept_again() -> None:
    """A supervisor run twice keeps the dynamic children of each run."""

    async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep_forever()

    sup = Supervisor([ChildSpec("conn", child, restart="temporary")], strategy="simple_one_for_one")
    for _ in range(2):
        async with sup.running():
            sup.start_child_soon()
            sup.start_child_soon()
            await anyio.wait_all_tasks_blocked()
            assert len(dynamic_tasks()) == 2
        assert dynamic_tasks() == []


@pytest.mark.parametrize(("restart", "restarted"), [("permanent", True), ("transient", True), ("temporary", False)])
async def test_a_crashing_dynamic_child_is_reported_and_restarted_as_its_restart_type_says(
    restart: str, restarted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash (an ``Exception``) of a child started by start_child_soon is reported and, but for a
    temporary child, restarted under the same id, on both backends (OTP's simple_one_for_one)."""
    runs: list[int] = []
    crash = anyio.Event()

    async def child(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        runs.append(len(runs))
        task_status.started(len(runs))
        if len(runs) == 1:
            await crash.wait()
            raise RuntimeError("worker crashed")
        await anyio.sleep_forever()

    template = ChildSpec("conn", child, restart=restart)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="pywsserver.supervision"):
        async with Supervisor([template], strategy="simple_one_for_one", intensity=3).running() as sup:
            handle = sup.start_child_soon()
            await anyio.wait_all_tasks_blocked()
            assert runs == [0]
            crash.set()
            await anyio.wait_all_tasks_blocked()
            await sup.settle()
            await anyio.wait_all_tasks_blocked()
            assert "worker crashed" in caplog.text
            if restarted:
                assert runs == [0, 1]
                assert sup.restart_count == 1
                assert [c.id for c in sup.which_children()] == [handle]
            else:
                assert runs == [0]
                assert sup.which_children() == []
    assert dynamic_tasks() == []


async def test_a_cancelled_group_stops_every_dynamic_child_and_waits_for_its_cleanup() -> None:
    """Another task of the supervisor's enclosing group fails: the supervisor is cancelled, and its
    children are stopped, their cleanup (which waits) done, before the error comes out."""
    cleaned: list[int] = []

    async def child(number: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()
                cleaned.append(number)

    async def supervised() -> None:
        template = ChildSpec("conn", child, restart="temporary", shutdown=5)
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            for number in range(3):
                sup.start_child_soon(number)
            await anyio.sleep_forever()

    with pytest.raises((ValueError, BaseExceptionGroup)) as caught:
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervised)
            await anyio.wait_all_tasks_blocked()
            assert len(dynamic_tasks()) == 3
            raise ValueError("a sibling failed")
    error = caught.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, ValueError)
    assert sorted(cleaned) == [0, 1, 2]
    assert dynamic_tasks() == []


async def test_errors_let_through_while_a_cancelled_group_stops_the_children_come_out() -> None:
    """A sibling fails, and two children let a ``BaseException`` through while they are being
    stopped: both come out of the group beside the sibling's error, as from tasks of the group."""

    async def child(kind: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            raise (Boom if kind == "a" else Boom2)(f"let through by {kind} while stopping")

    async def supervised() -> None:
        template = ChildSpec("conn", child, restart="temporary", shutdown=5)
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            sup.start_child_soon("a")
            sup.start_child_soon("b")
            await anyio.sleep_forever()

    with anyio.fail_after(10), pytest.raises(BaseException) as caught:  # noqa: PT011 - every leaf is checked below
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervised)
            await anyio.wait_all_tasks_blocked()
            assert len(dynamic_tasks()) == 2
            raise ValueError("a sibling failed")
    found = leaves(caught.value)
    assert ValueError in found
    assert Boom in found
    assert Boom2 in found
    assert dynamic_tasks() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_dynamic_child_task_cancelled_before_its_first_step_does_not_hang_the_stop() -> None:
    """asyncio only (on trio a child is a task of the group, reached only through its scope): a child's
    task cancelled with ``Task.cancel`` before it took a step never runs its start, so it never says
    it ended. The stop must not wait for it forever: it finds the task cancelled, which cancels the
    children's group, as anyio does for a task of a group cancelled from outside, and the
    supervisor fails, saying why."""
    import asyncio

    began: list[str] = []

    async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        began.append("began")
        task_status.started()
        await anyio.sleep_forever()

    template = ChildSpec("conn", child, restart="temporary", shutdown=5)
    with anyio.fail_after(10), pytest.raises(SupervisionError, match="cancelled from outside"):
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            sup.start_child_soon()
            tasks = [task for task in asyncio.all_tasks() if task.get_name() == DYNAMIC and not task.done()]
            assert len(tasks) == 1
            tasks[0].cancel()  # before its first step: its coroutine never runs
            await anyio.wait_all_tasks_blocked()
            assert tasks[0].cancelled()
        # (seen when the stop waits for the task: no done callback is kept per child)
    assert began == []
    assert dynamic_tasks() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_errors_let_through_after_a_child_task_was_cancelled_from_outside_come_out() -> None:
    """asyncio only: one child's task is cancelled with ``Task.cancel``, which cancels the
    supervisor's group (as anyio does for a task of a group); the two others let a
    ``BaseException`` through while they are stopped, and both come out of the supervisor."""
    import asyncio

    cancelled_task: list[asyncio.Task[Any]] = []

    async def child(kind: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        if kind == "cancelled":
            cancelled_task.append(asyncio.current_task())  # type: ignore[arg-type]
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            if kind != "cancelled":
                raise (Boom if kind == "a" else Boom2)(f"let through by {kind} while stopping")

    template = ChildSpec("conn", child, restart="temporary", shutdown=5)
    with anyio.fail_after(10), pytest.raises(BaseException) as caught:  # noqa: PT011 - every leaf is checked below
        async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
            sup.start_child_soon("a")
            sup.start_child_soon("cancelled")
            sup.start_child_soon("b")
            await anyio.wait_all_tasks_blocked()
            assert len(dynamic_tasks()) == 3
            cancelled_task[0].cancel()
            await anyio.sleep_forever()
    found = leaves(caught.value)
    assert Boom in found
    assert Boom2 in found
    assert dynamic_tasks() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.skipif(sys.version_info < (3, 12), reason="no eager task factory before Python 3.12")
async def test_children_that_end_in_their_first_step_under_an_eager_task_factory_are_not_kept() -> None:
    """With Python 3.12's eager task factory a child's run may end inside ``create_task``, before its
    task is stored: such a task must not be kept (one entry per connection, until the stop)."""
    import asyncio

    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    try:

        async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()  # and return at once: the run ends in its first step

        template = ChildSpec("conn", child, restart="temporary", shutdown=5)
        with anyio.fail_after(10):
            async with Supervisor([template], strategy="simple_one_for_one").running() as sup:
                for _ in range(100):
                    sup.start_child_soon()
                await anyio.wait_all_tasks_blocked()
                assert sup.count_children().active == 0
                assert sup._loop_children is not None
                assert sup._loop_children._running == {}
    finally:
        loop.set_task_factory(factory)
