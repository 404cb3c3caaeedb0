"""Observers of supervisors (`add_observer`): told of every restart and give-up, never able to break one."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import anyio
import pytest

from pywsserver.supervision import RestartIntensityExceeded, Supervisor, add_observer, remove_observer

from .supervision_helpers import Probe

pytestmark = pytest.mark.anyio


async def test_observers_see_each_restart_and_the_give_up_and_a_failing_one_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[Supervisor, str, Hashable]] = []

    def observer(supervisor: Supervisor, event: str, child_id: Hashable) -> None:
        seen.append((supervisor, event, child_id))

    def broken(supervisor: Supervisor, event: str, child_id: Hashable) -> None:
        raise RuntimeError("the observer failed")

    probe = Probe()
    sup = Supervisor([probe.spec("a"), probe.spec("b")], intensity=1, period=60)
    add_observer(broken)
    add_observer(observer)
    try:
        with pytest.raises(RestartIntensityExceeded), caplog.at_level(logging.ERROR, "pywsserver.supervision"):
            async with sup.running():
                await probe.controls["b"].end("crash", sup)
                assert seen == [(sup, "restart", "b")]
                await probe.controls["a"].end("crash")
                await anyio.sleep_forever()
    finally:
        remove_observer(observer)
        remove_observer(broken)
    assert seen == [(sup, "restart", "b"), (sup, "give_up", "a")]
    assert sum("supervisor observer" in r.getMessage() for r in caplog.records) == 2
    remove_observer(observer)  # removing twice is harmless
