"""The event-loop watchdog: a thread that notices when the loop is blocked and says by what.

Python cannot preempt a task: a handler that blocks (``time.sleep``, a
blocking driver, a long computation) stalls every connection of the loop.
The watchdog makes that visible. A thread schedules a *heartbeat* callback on
the event loop every ``threshold / 2`` seconds and checks that it ran; when
one has waited longer than ``threshold``, the loop is blocked, and the thread
logs one WARNING on the ``pywsserver.watchdog`` logger with how long, the
connection and handler whose code blocks it (found on the loop thread's
stack), and that stack (``sys._current_frames``). Reports are throttled (one
per ``report_interval``). Nothing is done per message: the only cost is one
callback on the loop per heartbeat. The lag each heartbeat measured is kept
in `LoopWatchdog.lag` (and the largest in ``max_lag``), and the blocks seen
are counted in ``blocked_count``, for the server's metrics.

Thread-safety without a lock: each figure has one writer. ``lag`` and
``max_lag`` are written only by the heartbeat, on the loop's thread;
``blocked_count`` only by the watchdog's thread. Readers on other threads
(a metrics scrape on the loop) read a whole int or float, never half of one.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["LoopWatchdog"]

logger = logging.getLogger("pywsserver.watchdog")


def _schedule_function() -> Callable[[Callable[[], None]], Any]:
    """How another thread asks the running event loop to call something soon, without waiting."""
    import asyncio

    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: trio
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


class LoopWatchdog:
    """Watches one event loop from a thread of its own; start it in the loop's thread with `start`."""

    def __init__(self, threshold: float, *, report_interval: float = 10.0) -> None:
        #: Seconds the loop may be blocked before it is reported.
        self.threshold = threshold
        #: How often (seconds) at most a blocked loop is reported.
        self.report_interval = report_interval
        #: How late the last heartbeat ran, in seconds (0 when the loop is idle and responsive).
        self.lag = 0.0
        #: The largest lag measured since `start`: the longest the loop was blocked, less at most
        #: ``threshold / 2`` (a block may begin just after a heartbeat ran; the next is sent within that).
        self.max_lag = 0.0
        #: How many times the loop was seen blocked past ``threshold``: noticed while blocked (reported,
        #: unless throttled) or, for a block that ended between two looks, by its heartbeat's lag.
        self.blocked_count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = 0
        self._scheduled_at = 0.0
        self._pending = False

    def start(self) -> None:
        """Start the thread; call from the event loop's thread."""
        self._loop_thread = threading.get_ident()
        schedule = _schedule_function()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(schedule,), name="pywsserver loop watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and join it (it wakes at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _beat(self) -> None:  # runs on the event loop
        lag = time.monotonic() - self._scheduled_at
        self.lag = lag
        if lag > self.max_lag:
            self.max_lag = lag
        self._pending = False

    def _watch(self, schedule: Callable[[Callable[[], None]], Any]) -> None:
        interval = self.threshold / 2
        reported_at = -float("inf")
        noticed = False
        while not self._stop.wait(interval):
            now = time.monotonic()
            if self._pending:
                if not noticed and now - self._scheduled_at > self.threshold:
                    noticed = True
                    self.blocked_count += 1
                    if now - reported_at >= self.report_interval:
                        reported_at = now
                        self._report(now - self._scheduled_at)
                continue
            if not noticed and self.lag > self.threshold:
                # Blocked past the threshold, but the heartbeat ran before this thread looked again:
                # counted, not reported (the stack that blocked is gone).
                self.blocked_count += 1
            noticed = False
            self._scheduled_at = now
            self._pending = True
            try:
                schedule(self._beat)
            except RuntimeError:  # the loop has closed
                return

    def _report(self, blocked_for: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return
        connection, handler = _blocking_connection(frame)
        stack = "".join(traceback.format_stack(frame))
        logger.warning(
            "the event loop has been blocked for %.2fs (threshold %gs): every connection waits; "
            "connection %s, handler %s; the code that blocks it:\n%s",
            blocked_for,
            self.threshold,
            connection,
            handler,
            stack,
        )


def _blocking_connection(frame: FrameType | None) -> tuple[str, str]:
    """The peer and handler of the connection whose call is on the blocked stack, if one is."""
    from ._handler_calls import HandlerCalls

    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, HandlerCalls):
            handler = candidate._handler
            try:
                peer = candidate._peer_text
            except Exception:  # the connection is half made: say what is known
                peer = "?"
            return repr(peer), repr(handler.name if handler is not None else None)
        frame = frame.f_back
    return "(none: not in a handler)", "(none)"
