"""The deadline queue: the asyncio connections' timers, kept off the event loop's own heap.

Why it exists: asyncio's pure-Python loop pays for any timer on its heap on
every turn (it reads the clock twice and computes a ``select`` timeout),
about 5,100 instructions a turn under callgrind, and every connection has a
timer (its handshake, idle, keepalive or close deadline). With the
connections' deadlines here instead, a turn of the loop costs what it costs
a server with no timer at all; a deadline costs one thread wake when it is
due.

Theory of operation
-------------------
One `DeadlineQueue` per event loop (see ``_asyncio_driver``: the server
starts it and stops it, and the event loop's connections share it). Two
threads touch it, each with its own part:

- The *loop's thread* owns the heap of entries ``[deadline, seq, target]``
  and every count. `DeadlineQueue.add` gives a target a deadline (replacing
  the one it had); `DeadlineQueue.cancel` takes it away. A replaced or
  cancelled entry is not searched for: its target is set to ``None`` (which
  lets go of the target at once) and it is skipped when it reaches the top.
  When the stale entries outnumber the live ones by more than
  `DeadlineQueue.SLACK_ENTRIES`, the heap is rebuilt without them: it never
  holds more than twice the live entries and that slack, and a rebuild is
  paid for by the half as many adds and cancels before it.
- The *queue's thread* sleeps on a condition until the earliest deadline
  the loop told it of (``_wake_deadline``), then asks the loop, with
  ``call_soon_threadsafe``, to run `DeadlineQueue._run_due`, and sleeps
  until told of a deadline again. `_run_due` takes every entry due by the
  loop's clock off the heap, calls each target's ``_deadline_due()`` in
  deadline order, and tells the thread of the new earliest deadline.

Only a deadline *earlier* than the one the thread sleeps until takes the
condition's lock and wakes the thread; a later one is a heap push. (The
connection core asks for a wake-up only when a deadline moves earlier than
the one it asked for: moving the idle deadline later on every read is a
dict store there and never reaches this module.)

Timing: a target is called no earlier than its deadline (by the loop's
clock, ``time.monotonic``) and, when the loop is not busy, within about a
millisecond after it (the thread's wake, the loop's wake through its
self-pipe); a busy loop runs it when the turn in progress ends, as it would
its own timer; the GIL may hold the thread back up to
``sys.getswitchinterval()`` (5 ms by default). ``tests/test_deadline_queue.py``
holds every deadline to at most `LATE_BOUND` seconds late.

The thread has an owner: whoever calls `DeadlineQueue.start` calls
`DeadlineQueue.stop`, which wakes and joins it; live entries left then go
to the event loop's own timers, so that no deadline is lost.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["LATE_BOUND", "DeadlineQueue", "DeadlineTarget"]

#: The most a deadline may be late on an idle event loop, the tests' bound (seconds).
LATE_BOUND = 0.010

_INFINITY = float("inf")


class DeadlineTarget(Protocol):
    """What the queue calls when a deadline is due; it keeps the target's live entry on the target."""

    #: The target's live entry in its queue (``[deadline, seq, target]``), ``None`` when it has none.
    _deadline_entry: list[Any] | None

    def _deadline_due(self) -> None:
        """The deadline is due (called on the event loop's thread; the entry is gone already)."""


class DeadlineQueue:
    """Deadlines of many targets on one event loop, woken by one thread of its own.

    ``loop`` is the event loop (``call_soon_threadsafe``, ``call_at`` and
    ``call_exception_handler`` are used); ``clock`` must be the clock of its
    ``time()`` (``time.monotonic`` for asyncio's own loops). Every method but
    the thread's own runs on the loop's thread.
    """

    #: How many more stale entries than live ones the heap may hold before it is rebuilt.
    SLACK_ENTRIES = 32

    __slots__ = (
        "_armed",
        "_clock",
        "_condition",
        "_heap",
        "_live",
        "_loop",
        "_seq",
        "_stopping",
        "_thread",
        "_wake_deadline",
        "thread_wakes",
    )

    def __init__(self, loop: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._clock = clock
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()  # orders equal deadlines by when they were added
        self._live = 0  # targets with an entry
        # The loop's side: the deadline the thread was last told of (+inf once it has fired, -inf
        # while `_run_due` runs: the deadlines added meanwhile are told once, at its end).
        self._armed = _INFINITY
        # The thread's side, under the condition's lock: when to wake the loop next.
        self._condition = threading.Condition(threading.Lock())
        self._wake_deadline = _INFINITY
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: How many times the thread has woken the loop (written by the thread only).
        self.thread_wakes = 0

    def __len__(self) -> int:
        """The targets that have a deadline."""
        return self._live

    @property
    def heap_size(self) -> int:
        """Entries on the heap, live and stale (at most ``2 * len(self) + SLACK_ENTRIES``)."""
        return len(self._heap)

    @property
    def running(self) -> bool:
        """Whether the thread runs (started and not stopped)."""
        return self._thread is not None

    # ------------------------------------------------------------ the loop's side

    def add(self, target: DeadlineTarget, deadline: float) -> None:
        """Call ``target._deadline_due()`` at ``deadline``, instead of at the deadline it had."""
        old = target._deadline_entry
        if old is None:
            self._live += 1
        else:
            old[2] = None
        entry = [deadline, next(self._seq), target]
        target._deadline_entry = entry
        heap = self._heap
        heapq.heappush(heap, entry)
        # Every live entry is on the heap (but those `_run_due` holds): the rest are stale.
        if len(heap) > 2 * self._live + self.SLACK_ENTRIES:
            self._rebuild()
        if deadline < self._armed:
            self._arm(deadline)

    def cancel(self, target: DeadlineTarget) -> None:
        """No call for ``target`` (if it had a deadline)."""
        entry = target._deadline_entry
        if entry is not None:
            entry[2] = None
            target._deadline_entry = None
            self._live -= 1
            if len(self._heap) > 2 * self._live + self.SLACK_ENTRIES:
                self._rebuild()

    def _rebuild(self) -> None:
        heap = self._heap  # in place: `_run_due` holds it
        heap[:] = [entry for entry in heap if entry[2] is not None]
        heapq.heapify(heap)

    def _arm(self, deadline: float) -> None:
        """Tell the thread of an earlier deadline (the only path that takes the lock)."""
        self._armed = deadline
        with self._condition:
            if deadline < self._wake_deadline:
                self._wake_deadline = deadline
                self._condition.notify()

    def _run_due(self) -> None:
        """The thread's wake-up, on the loop: call the targets whose deadline is due, in order.

        The due entries are taken off the heap first, so that deadlines added by the calls wait for
        a wake-up of their own; one replaced or cancelled by an earlier call of the batch is skipped.
        """
        self._armed = -_INFINITY
        heap = self._heap
        try:
            now = self._clock()
            due = []
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap))
            for entry in due:
                target = entry[2]
                if target is None:  # stale, or replaced or cancelled by an earlier call
                    continue
                entry[2] = None
                target._deadline_entry = None
                self._live -= 1
                try:
                    target._deadline_due()
                except Exception as error:  # as the event loop does with a timer callback that raises
                    self._loop.call_exception_handler(
                        {"message": "a deadline's callback failed", "exception": error, "target": target}
                    )
            while heap and heap[0][2] is None:  # the thread need not wake for a stale entry
                heapq.heappop(heap)
        finally:
            self._armed = _INFINITY
            if heap:
                self._arm(heap[0][0])

    # ------------------------------------------------------------ the thread

    def start(self) -> None:
        """Start the thread (call from the loop's thread; the caller owns it and must `stop` it)."""
        if self._thread is not None:
            raise RuntimeError("the deadline queue is running already")
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="pywsserver deadlines")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and join it; any live deadline goes to the event loop's own timers."""
        thread = self._thread
        if thread is not None:
            with self._condition:
                self._stopping = True
                self._condition.notify()
            thread.join()
            self._thread = None
        self._armed = self._wake_deadline = _INFINITY
        heap, self._heap = self._heap, []
        for entry in sorted(heap):
            target = entry[2]
            if target is not None:
                entry[2] = None
                target._deadline_entry = None
                self._live -= 1
                self._loop.call_at(entry[0], target._deadline_due)

    def _watch(self) -> None:
        condition = self._condition
        clock = self._clock
        with condition:
            while not self._stopping:
                deadline = self._wake_deadline
                if deadline == _INFINITY:
                    condition.wait()
                    continue
                left = deadline - clock()
                if left > 0:
                    condition.wait(left)
                    continue
                self._wake_deadline = _INFINITY
                self.thread_wakes += 1
                try:
                    self._loop.call_soon_threadsafe(self._run_due)
                except RuntimeError:  # the loop is closed: nothing left to wake
                    return
