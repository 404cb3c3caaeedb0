"""The event-loop watchdog: a handler that blocks the loop is reported once, by name, with its stack, and
counted in the server's metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pywsserver import OptionError, start_link
from pywsserver._watchdog import LoopWatchdog

from .test_metrics import scrape, value
from .wstools import in_client_thread, url

pytestmark = pytest.mark.anyio


class Reported(logging.Handler):
    """Sets an event (thread-safe) when the watchdog logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.event.set()


class Sleeper:
    """A sync handler that blocks the event loop in time.sleep until the watchdog has spoken (at most 10 s)."""

    reported: threading.Event

    def init(self, options: dict[str, Any]) -> None:
        return None

    def handle(self, message: object, state: None) -> Any:
        if message == "block":
            deadline = time.monotonic() + 10
            while not self.reported.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        return ("reply", message, state)


def options(handler: Any, *top: tuple[str, Any]) -> list[tuple[str, Any]]:
    ws = [("handler_module", handler)]
    return [("port", 0), *top, ("worker_options", [("protocol_modules", [("websocket", ws)])])]


async def test_a_blocked_loop_is_reported_once_naming_the_connection_the_handler_and_the_stack() -> None:
    """Erlang's scheduler preempts a process once it has used its reductions, so a busy handler delays
    only its own connection. Python cannot preempt a task; the watchdog at least notices a loop blocked
    past loop_watchdog and logs one WARNING naming the connection, the handler and the blocking stack."""
    reported = Reported()
    sleeper = Sleeper()
    sleeper.reported = reported.event
    watchdog_logger = logging.getLogger("pywsserver.watchdog")
    watchdog_logger.addHandler(reported)
    try:
        async with start_link(options(sleeper, ("loop_watchdog", 0.1))) as server:
            assert server.watchdog is not None

            async def client(address: str) -> list[str]:
                from websockets.asyncio.client import connect

                async with connect(address) as ws:
                    await ws.send("block")
                    first = str(await ws.recv())
                    await ws.send("after")
                    return [first, str(await ws.recv())]

            assert await in_client_thread(client, url(server)) == ["block", "after"]
            assert server.watchdog.max_lag > 0.1
            assert server.watchdog.blocked_count >= 1
    finally:
        watchdog_logger.removeHandler(reported)
    assert len(reported.records) == 1  # one block, one report
    text = reported.records[0].getMessage()
    assert "blocked for" in text and "'Sleeper'" in text and "127.0.0.1" in text
    assert "in handle" in text and "time.sleep" in text  # the stack of the code that blocks
    assert reported.records[0].levelno == logging.WARNING


async def test_the_watchdog_is_off_with_none_and_its_option_is_checked() -> None:
    async with start_link(options(Sleeper, ("loop_watchdog", None))) as server:
        assert server.watchdog is None
    with pytest.raises(OptionError, match="loop_watchdog"):
        async with start_link(options(Sleeper, ("loop_watchdog", -1))):
            pass


async def test_the_watchdog_thread_runs_with_the_server_and_is_joined_on_stop() -> None:
    async with start_link(options(Sleeper)) as server:
        assert server.watchdog is not None and server.watchdog.threshold == 0.5
        assert any(t.name == "pywsserver loop watchdog" for t in threading.enumerate())
    assert not any(t.name == "pywsserver loop watchdog" for t in threading.enumerate())


class Blocker:
    """A sync handler that blocks the event loop in time.sleep until the watchdog has counted a block (at most 10 s)."""

    server: Any

    def init(self, options: dict[str, Any]) -> None:
        return None

    def handle(self, message: object, state: None) -> Any:
        if message == "block":
            deadline = time.monotonic() + 10
            while self.server.watchdog.blocked_count == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        return ("reply", message, state)


def with_metrics_path(options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    options[-1][1][0][1].append(("http", [("metrics_path", "/metrics")]))
    return options


async def test_a_blocked_loop_is_counted_in_the_metrics_with_the_longest_block() -> None:
    """Where Erlang would have preempted a busy process, the watchdog's detections also go to the metrics:
    a handler blocking in time.sleep past loop_watchdog moves pywsserver_event_loop_blocks_total from 0
    and sets the longest block to at least the threshold, scraped over HTTP."""
    threshold = 0.2
    blocker = Blocker()
    async with start_link(with_metrics_path(options(blocker, ("loop_watchdog", threshold)))) as server:
        blocker.server = server
        before = await scrape(server.port)
        assert ("pywsserver_event_loop_blocks_total", ()) in before  # shown from the start
        blocks_before = value(before, "pywsserver_event_loop_blocks_total")  # 0 unless the machine stalled us

        async def client(address: str) -> str:
            from websockets.asyncio.client import connect

            async with connect(address) as ws:
                await ws.send("block")
                return str(await ws.recv())

        assert await in_client_thread(client, url(server)) == "block"
        after = await scrape(server.port)
        assert value(after, "pywsserver_event_loop_blocks_total") >= blocks_before + 1
        assert value(after, "pywsserver_event_loop_longest_block_seconds") >= threshold
        assert server.watchdog is not None
        assert value(after, "pywsserver_event_loop_longest_block_seconds") <= server.watchdog.max_lag


async def test_without_the_watchdog_the_metrics_have_no_block_figures() -> None:
    async with start_link(with_metrics_path(options(Sleeper, ("loop_watchdog", None)))) as server:
        figures = await scrape(server.port)
    assert not any(name.startswith("pywsserver_event_loop_blocks") for name, _ in figures)
    assert not any(name.startswith("pywsserver_event_loop_longest_block") for name, _ in figures)
    assert ("pywsserver_event_loop_lag_seconds", ()) in figures  # the metrics' own probe stays


def test_a_block_that_ends_before_the_watchdog_looks_again_is_counted_once() -> None:
    """A heartbeat that ran late by more than the threshold, seen only after it ran (the block was over
    before the watchdog's thread looked), counts one block: no report (its stack is gone), no double count.
    The heartbeat is run on the watchdog's own thread here, as if scheduled a second earlier, so the
    order of the thread's looks is fixed."""
    watchdog = LoopWatchdog(0.05)
    schedules = 0
    more_heartbeats = threading.Event()

    def schedule(beat: Callable[[], None]) -> None:
        nonlocal schedules
        schedules += 1
        if schedules == 1:
            watchdog._scheduled_at -= 1.0  # this heartbeat waited a second: the loop was blocked
        beat()
        if schedules == 5:
            more_heartbeats.set()

    thread = threading.Thread(target=watchdog._watch, args=(schedule,))
    thread.start()
    try:
        assert more_heartbeats.wait(10)
    finally:
        watchdog._stop.set()
        thread.join(10)
    assert watchdog.blocked_count == 1
    assert watchdog.max_lag >= 1.0
