"""Faults end to end: handlers crashing under load, a crashing user process, a tree that gives up,
and random interleavings of client actions checked against the server's invariants."""

from __future__ import annotations

import random
import sys

import anyio
import pytest
from wsproto.events import CloseConnection, TextMessage

from pywsserver import start_link

from .recorder import Recorder, server_options
from .reliability_tools import Baseline
from .wstools import RawClient

pytestmark = pytest.mark.anyio

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


async def test_handlers_crashing_on_a_tenth_of_messages_close_only_their_connection() -> None:
    """100 clients x 30 messages; about 10% of messages make the handler raise.

    Each crash closes its own connection with 1011; every other message is echoed, in order, on the
    right connection; afterwards nothing is left behind.
    """
    clients, per_client = 100, 30
    chooser = random.Random(20261126)
    plans = [[chooser.random() < 0.1 for _ in range(per_client)] for _ in range(clients)]
    recorder = Recorder()
    outcomes: dict[int, tuple[list[str], int | None]] = {}

    async def client(number: int, port: int) -> None:
        connection = await RawClient.connect(port)
        echoed: list[str] = []
        code = None
        for index, crash in enumerate(plans[number]):
            text = "raise" if crash else f"{number}:{index}"
            await connection.send(TextMessage(data=text))
            event = await connection.next_event(timeout=20)
            if isinstance(event, CloseConnection):
                code = event.code
                await connection.send(event.response())  # complete the closing handshake
                break
            assert isinstance(event, TextMessage)
            echoed.append(event.data)
        if code is None:
            await connection.send(CloseConnection(code=1000))
            await connection.next_event(timeout=20)
        await connection.aclose()
        outcomes[number] = (echoed, code)

    async with start_link(server_options(recorder, number_of_workers=4)) as server:
        baseline = Baseline()
        async with anyio.create_task_group() as tg:
            for number in range(clients):
                tg.start_soon(client, number, server.port)
        await recorder.wait_for(lambda: len(recorder.closes) == clients, timeout=20)
        recorder.workers.clear()  # the test's own references
        recorder.inits.clear()
        await baseline.assert_restored(server)

    crashed = 0
    for number, (echoed, code) in outcomes.items():
        plan = plans[number]
        first_crash = plan.index(True) if True in plan else None
        if first_crash is None:
            assert code is None
            assert echoed == [f"{number}:{i}" for i in range(per_client)]
        else:
            crashed += 1
            assert code == 1011
            assert echoed == [f"{number}:{i}" for i in range(first_crash)]
    assert crashed > 50  # the ordeal really happened (with this seed, most clients meet a crash)
    assert sorted(close.code for _, close in recorder.closes).count(1011) == crashed


async def test_a_user_process_in_the_tree_that_crashes_is_restarted_and_callers_get_an_error() -> None:
    """The chat room crashes; callers get NotRunning or the crash, not a hang; the room comes back."""
    sys.path.insert(0, str(ROOT))
    try:
        from examples.chat import chat_tree
    finally:
        sys.path.remove(str(ROOT))
    from pywsserver.supervision import NotRunning, call, whereis

    tree = chat_tree(port=0)
    async with tree.running():
        room = whereis("chat_room")
        assert await call("chat_room", "said") == 0
        with anyio.fail_after(5), pytest.raises(NotRunning):  # the room raises ValueError and dies
            await call("chat_room", "no such request")
        with anyio.fail_after(5):
            while whereis("chat_room") in (None, room):
                await anyio.lowlevel.checkpoint()
        assert await call("chat_room", "said") == 0  # a fresh room
        assert tree.restart_count == 1


async def test_the_cli_exits_non_zero_naming_the_child_when_the_tree_gives_up() -> None:
    """Every accept fails: the acceptors, then the server's supervisor, give up as OTP would."""
    result = await anyio.run_process(
        [sys.executable, "-m", "pywsserver", "--port", "0", "--handler", "tests.faulty_accept"],
        cwd=ROOT,
        check=False,
    )
    log = result.stderr.decode()
    assert result.returncode == 1, log
    assert "the server gave up" in log
    assert "acceptor_supervisor" in log
    assert "accept is broken on purpose" in log
