"""The deadline queue: the asyncio connections' timers off the event loop's heap, one thread to wake it.

Its unit behaviour on a fake loop and clock (earlier and later deadlines, cancel, many targets, the
heap's bound, a model-based property test), its thread on a real event loop, then connections served
end to end with real clients: the idle, keepalive and handshake timeouts still close them in bounded
time, with no connection timer on asyncio's heap, and a stopped server leaves no thread running.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywsserver import start_link
from pywsserver._asyncio_driver import ProtocolDriver, _loop_shared, deadline_queue
from pywsserver._deadlines import LATE_BOUND, DeadlineQueue

from .recorder import server_options
from .wstools import in_client_thread, no_connections, url

THREAD_NAME = "pywsserver deadlines"


class FakeLoop:
    """What the queue asks of an event loop, recorded; nothing runs by itself."""

    def __init__(self) -> None:
        self.soon: list[Any] = []
        self.at: list[tuple[float, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def call_soon_threadsafe(self, callback: Any) -> None:
        self.soon.append(callback)

    def call_at(self, when: float, callback: Any) -> None:
        self.at.append((when, callback))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Target:
    """A deadline target that records when it was called (and may ask for a new deadline then)."""

    def __init__(self, name: Any, fired: list[Any], clock: Any = None) -> None:
        self._deadline_entry: list[Any] | None = None
        self.name = name
        self.fired = fired
        self.clock = clock
        self.again: tuple[DeadlineQueue, float] | None = None  # (queue, seconds): re-armed when called

    def _deadline_due(self) -> None:
        self.fired.append(self.name if self.clock is None else (self.name, self.clock()))
        if self.again is not None:
            queue, seconds = self.again
            self.again = None
            queue.add(self, queue._clock() + seconds)


def fake_queue() -> tuple[DeadlineQueue, FakeLoop, FakeClock]:
    loop, clock = FakeLoop(), FakeClock()
    return DeadlineQueue(loop, clock), loop, clock


def run_until(queue: DeadlineQueue, clock: FakeClock, now: float) -> None:
    clock.now = now
    queue._run_due()


def test_an_earlier_deadline_replaces_a_later_one_and_fires_once() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    target = Target("a", fired)
    queue.add(target, 10.0)
    queue.add(target, 5.0)
    run_until(queue, clock, 4.999)
    assert fired == []
    run_until(queue, clock, 5.0)
    assert fired == ["a"]
    run_until(queue, clock, 11.0)  # the replaced deadline is stale: no second call
    assert fired == ["a"]
    assert len(queue) == 0 and queue.heap_size == 0


def test_a_later_deadline_replaces_an_earlier_one() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    target = Target("a", fired)
    queue.add(target, 5.0)
    queue.add(target, 10.0)
    run_until(queue, clock, 9.0)
    assert fired == []
    run_until(queue, clock, 10.0)
    assert fired == ["a"]


def test_a_cancelled_deadline_never_fires_and_lets_go_of_its_target() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    kept, cancelled = Target("kept", fired), Target("cancelled", fired)
    queue.add(cancelled, 1.0)
    queue.add(kept, 2.0)
    queue.cancel(cancelled)
    queue.cancel(cancelled)  # twice: nothing more happens
    assert cancelled._deadline_entry is None
    assert all(entry[2] is not cancelled for entry in queue._heap)  # the stale entry holds no reference
    run_until(queue, clock, 3.0)
    assert fired == ["kept"]
    assert len(queue) == 0


def test_many_targets_fire_in_deadline_order_each_once() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    targets = [Target(index, fired) for index in range(3000)]
    deadlines = {index: float((index * 7919) % 3000) / 100 for index in range(3000)}
    for target in targets:
        queue.add(target, deadlines[target.name])
    run_until(queue, clock, 15.0)
    assert fired == sorted((index for index in deadlines if deadlines[index] <= 15.0), key=lambda i: deadlines[i])
    run_until(queue, clock, 100.0)
    assert sorted(fired) == list(range(3000))
    assert len(queue) == 0


def test_equal_deadlines_fire_in_the_order_they_were_set() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    for name in "cab":
        queue.add(Target(name, fired), 1.0)
    run_until(queue, clock, 1.0)
    assert fired == ["c", "a", "b"]


def test_stale_entries_stay_bounded_by_the_live_ones() -> None:
    queue, _, clock = fake_queue()
    fired: list[Any] = []
    target = Target("moved", fired)
    for step in range(10_000):  # moved earlier and earlier: each move leaves a stale entry
        queue.add(target, 10_000.0 - step)
        assert queue.heap_size <= 2 * len(queue) + DeadlineQueue.SLACK_ENTRIES
    many = [Target(index, fired) for index in range(1000)]
    for other in many:
        queue.add(other, 50_000.0)
    for other in many:  # connections that end: cancelled
        queue.cancel(other)
        assert queue.heap_size <= 2 * len(queue) + DeadlineQueue.SLACK_ENTRIES
    run_until(queue, clock, 60_000.0)
    assert fired == ["moved"]


def test_only_an_earlier_deadline_tells_the_thread() -> None:
    arms: list[float] = []

    class Counting(DeadlineQueue):
        __slots__ = ()

        def _arm(self, deadline: float) -> None:
            arms.append(deadline)
            super()._arm(deadline)

    loop, clock = FakeLoop(), FakeClock()
    queue = Counting(loop, clock)
    fired: list[Any] = []
    target = Target("a", fired)
    queue.add(target, 5.0)
    for later in (6.0, 7.0, 100.0):  # the idle deadline moved later: heap pushes only
        queue.add(Target(later, fired), later)
    assert arms == [5.0]
    queue.add(Target("early", fired), 1.0)
    assert arms == [5.0, 1.0]
    run_until(queue, clock, 1.5)  # the wake-up tells the thread of the next deadline, once
    assert fired == ["early"]
    assert arms == [5.0, 1.0, 5.0]


def test_a_callback_that_raises_is_reported_and_the_others_still_run() -> None:
    queue, loop, clock = fake_queue()
    fired: list[Any] = []

    class Broken(Target):
        def _deadline_due(self) -> None:
            raise ValueError("broken")

    queue.add(Broken("broken", fired), 1.0)
    queue.add(Target("fine", fired), 2.0)
    run_until(queue, clock, 3.0)
    assert fired == ["fine"]
    assert [type(error["exception"]) for error in loop.errors] == [ValueError]


def test_stop_hands_the_live_deadlines_to_the_loops_own_timers() -> None:
    queue, loop, _ = fake_queue()
    fired: list[Any] = []
    first, second, cancelled = Target("first", fired), Target("second", fired), Target("cancelled", fired)
    queue.add(second, 9.0)
    queue.add(first, 4.0)
    queue.add(cancelled, 1.0)
    queue.cancel(cancelled)
    queue.stop()
    assert [(when, callback.__self__.name) for when, callback in loop.at] == [(4.0, "first"), (9.0, "second")]
    assert first._deadline_entry is None and second._deadline_entry is None
    assert len(queue) == 0 and queue.heap_size == 0


# A model of the queue: the target's current deadline and the order it was set in.
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 7), st.integers(0, 400)),
        st.tuples(st.just("cancel"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("again"), st.integers(0, 7), st.integers(0, 50)),  # re-arm when it fires
        st.tuples(st.just("run"), st.just(0), st.integers(0, 40)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(_operations)
def test_any_sequence_of_set_move_and_cancel_fires_exactly_the_due_deadlines_in_order(
    operations: list[tuple[str, int, int]],
) -> None:
    queue, loop, clock = fake_queue()
    fired: list[Any] = []
    targets = [Target(index, fired) for index in range(8)]
    model: dict[int, tuple[float, int]] = {}  # target -> (deadline, order set)
    order = 0
    for kind, index, value in operations:
        target = targets[index]
        if kind == "set":
            deadline = clock.now + value / 10
            queue.add(target, deadline)
            model[index] = (deadline, order)
            order += 1
        elif kind == "cancel":
            queue.cancel(target)
            model.pop(index, None)
        elif kind == "again":
            target.again = (queue, value / 10)
        else:
            clock.now += value / 10
            due = sorted((entry, name) for name, entry in model.items() if entry[0] <= clock.now)
            fired.clear()
            queue._run_due()
            assert fired == [name for _, name in due]
            for _, name in due:
                del model[name]
            for name in fired:  # what the calls asked for, in the order they asked
                again = targets[name]._deadline_entry
                if again is not None:
                    model[name] = (again[0], order)
                    order += 1
        assert len(queue) == len(model)
        assert queue.heap_size <= 2 * len(queue) + DeadlineQueue.SLACK_ENTRIES
    queue.stop()
    assert sorted((when, callback.__self__.name) for when, callback in loop.at) == sorted(
        (deadline, name) for name, (deadline, _) in model.items()
    )


# ------------------------------------------------------------------ the thread, on a real event loop


def deadline_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


def test_the_thread_wakes_the_loop_at_each_deadline_never_early_and_stop_joins_it() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        queue = DeadlineQueue(loop)
        queue.start()
        try:
            fired: list[Any] = []
            all_fired = asyncio.Event()
            count = 60

            class Recording(Target):
                def _deadline_due(self) -> None:
                    super()._deadline_due()
                    if len(fired) == count:
                        all_fired.set()

            start = time.monotonic()
            deadlines = {index: start + 0.02 + (index % 20) * 0.005 for index in range(count)}
            for index in range(count):
                target = Recording(index, fired, time.monotonic)
                queue.add(target, deadlines[index] + 1.0)  # set, then moved earlier
                queue.add(target, deadlines[index])
            await asyncio.wait_for(all_fired.wait(), 10)
            assert len(queue) == 0
            assert sorted(name for name, _ in fired) == list(range(count))
            lateness = [at - deadlines[name] for name, at in fired]
            assert min(lateness) >= 0  # never early
            assert queue.thread_wakes <= 20 + 1  # one wake per distinct deadline, at most
            return lateness
        finally:
            queue.stop()
            assert not queue.running

    lateness = asyncio.run(main())
    assert deadline_threads() == []
    # Late by a thread wake and a loop wake: the median is the bound; one wake delayed by the shared
    # machine's scheduler is tolerated up to a second.
    assert statistics.median(lateness) <= LATE_BOUND
    assert max(lateness) < 1.0


# ------------------------------------------------------------------ end to end, asyncio


def connection_timers_on_the_loop(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The event loop's scheduled timers that belong to a connection's driver."""
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    return [
        handle
        for handle in scheduled
        if not handle.cancelled() and isinstance(getattr(handle._callback, "__self__", None), ProtocolDriver)
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_idle_connections_of_a_websockets_client_close_in_bounded_time_with_no_loop_timer() -> None:
    idle_timeout = 1.0  # long enough for the checks below to find the connections open
    options = server_options(websocket=[("ping_interval", None), ("idle_timeout", idle_timeout)])
    loop = asyncio.get_running_loop()
    opened, checked = threading.Event(), threading.Event()

    async def client(address: str) -> list[tuple[int | None, float]]:
        from websockets.asyncio.client import connect

        results = []
        async with connect(address, ping_interval=None) as first, connect(address, ping_interval=None) as second:
            await first.send("hello")
            assert await first.recv() == "hello"
            opened_at = time.monotonic()
            opened.set()
            await asyncio.to_thread(checked.wait, 10)
            for ws in (first, second):
                await ws.wait_closed()  # the server's idle timeout closes it
                results.append((ws.close_code, time.monotonic() - opened_at))
        return results

    async with start_link(options) as server:
        async with anyio.create_task_group() as tasks:

            async def run_client() -> None:
                results.extend(await in_client_thread(client, url(server), timeout=20))

            results: list[tuple[int | None, float]] = []
            tasks.start_soon(run_client)
            with anyio.fail_after(10):
                while not opened.is_set():
                    await anyio.lowlevel.checkpoint()
            queue = _loop_shared(loop).deadlines
            assert queue is not None and queue.running
            assert len(queue) == 2  # each connection's idle deadline, in the queue
            assert connection_timers_on_the_loop(loop) == []  # and nothing on asyncio's heap
            checked.set()
        assert [code for code, _ in results] == [1001, 1001]
        assert all(elapsed < idle_timeout + 5 for _, elapsed in results)
        assert await no_connections(server)
    assert deadline_threads() == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_websockets_client_that_stops_reading_is_closed_by_the_keepalive_pong_timeout() -> None:
    options = server_options(websocket=[("ping_interval", 0.1), ("ping_timeout", 0.2), ("close_timeout", 0.3)])
    gone = threading.Event()

    async def client(address: str) -> int | None:
        from websockets.asyncio.client import connect

        async with connect(address, ping_interval=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            ws.transport.pause_reading()  # the server's pings are not read, so never answered
            await asyncio.to_thread(gone.wait, 10)
            ws.transport.resume_reading()  # now the ping and the close frame that followed it
            await ws.wait_closed()
            return ws.close_code

    async with start_link(options) as server:
        async with anyio.create_task_group() as tasks:
            codes: list[int | None] = []

            async def run_client() -> None:
                codes.append(await in_client_thread(client, url(server), timeout=20))

            tasks.start_soon(run_client)
            with anyio.fail_after(10):
                while server.connections == 0:
                    await anyio.lowlevel.checkpoint()
            # The pong timeout closes with 1011 and, the close unanswered, drops the socket.
            assert await no_connections(server, timeout=10)
            gone.set()
        assert codes == [1011]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_thousand_silent_connections_are_all_timed_out_in_the_handshake_none_early() -> None:
    handshake_timeout = 0.3
    options = server_options(max_connections=2000, number_of_workers=4)
    options[-1][1][0][1].append(("http", [("handshake_timeout", handshake_timeout)]))
    async with start_link(options) as server:
        streams = []
        try:
            for _ in range(1000):  # one after another: each connect takes a fraction of a millisecond
                # Taken before the connect, so before the server's accept starts the deadline (taken
                # after, it can come after the accept too: both run on this event loop).
                before = time.monotonic()
                streams.append((await anyio.connect_tcp("127.0.0.1", server.port), before))
            lasted: list[float] = []  # from before the client's connect to the server's close

            async def until_closed(stream: anyio.abc.SocketStream, before: float) -> None:
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    lasted.append(time.monotonic() - before)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tasks:
                    for stream, before in streams:
                        tasks.start_soon(until_closed, stream, before)
            assert len(lasted) == 1000
            assert min(lasted) >= handshake_timeout  # no connection timed out early
            assert await no_connections(server)
        finally:
            for stream, _ in streams:
                await stream.aclose()


@pytest.mark.anyio
async def test_a_stopped_server_leaves_no_deadline_thread_and_two_servers_share_one(anyio_backend: str) -> None:
    options = server_options()
    async with start_link(options) as first:
        async with start_link(options) as second, await anyio.connect_tcp("127.0.0.1", second.port):
            if anyio_backend == "asyncio":
                assert len(deadline_threads()) == 1  # one per event loop, not per server
            else:
                assert deadline_threads() == []  # trio keeps its own deadlines
        if anyio_backend == "asyncio":
            assert len(deadline_threads()) == 1  # the first server still runs on this loop
            async with await anyio.connect_tcp("127.0.0.1", first.port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\n")  # a handshake under way: its deadline queued
                shared = _loop_shared(asyncio.get_running_loop())
                with anyio.fail_after(5):
                    while shared.deadlines is None or len(shared.deadlines) == 0:
                        await anyio.lowlevel.checkpoint()
    assert deadline_threads() == []


@pytest.mark.anyio
async def test_deadline_queue_is_only_for_asyncios_own_loops(anyio_backend: str) -> None:
    with deadline_queue() as queue:
        if anyio_backend == "asyncio":
            assert queue is not None and queue.running
            with deadline_queue() as again:
                assert again is queue
            assert queue.running  # the outer user still has it
        else:
            assert queue is None
    assert queue is None or not queue.running
    assert deadline_threads() == []
