"""A small supervision tree: watch a crashing child restart, then the supervisor give up.

Run it with ``python examples/supervision_demo.py``.
"""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from pywsserver.supervision import ChildSpec, RestartIntensityExceeded, Strategy, Supervisor


async def steady(*, task_status: anyio.abc.TaskStatus[str]) -> None:
    task_status.started("steady")
    await anyio.sleep_forever()


async def flaky(crash_after: float, *, task_status: anyio.abc.TaskStatus[str]) -> None:
    task_status.started("flaky")
    await anyio.sleep(crash_after)
    raise RuntimeError("flaky crashed")


async def main() -> None:
    supervisor = Supervisor(
        [ChildSpec("steady", steady), ChildSpec("flaky", flaky, args=(0.2,))],
        strategy=Strategy.ONE_FOR_ONE,
        intensity=3,
        period=5,
        name="demo",
    )
    try:
        async with supervisor.running():
            print("children:", [(c.id, c.running) for c in supervisor.which_children()])
            await anyio.sleep(5)
    except RestartIntensityExceeded as error:
        print(f"escalated after {supervisor.restart_count} restarts: {error}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    anyio.run(main)
