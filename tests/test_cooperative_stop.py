"""Workers that stop cooperatively: on asyncio, where every handler is sync and TLS is off, the worker
supervisor stops a worker through the stop function the worker gives it (no cancel scope per
connection). What a stop does must be what a cancellation does: drain, tell the handler, end."""

from __future__ import annotations

import ssl
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import CloseConnection, TextMessage

from pywsserver import ConnectionClose, start_link, threaded
from pywsserver._options import parse_options
from pywsserver._server import Server
from pywsserver.supervision import ChildSpec, Strategy, Supervisor

from .recorder import Recorder, SyncRecordingHandler, server_options
from .test_server_protocols import LineEcho
from .wstools import RawClient

pytestmark = pytest.mark.anyio


class AsyncInit:
    async def init(self, options: dict[str, Any]) -> None:
        return None

    def handle(self, message: Any, state: Any) -> Any:
        return ("noreply", state)


def sync_options(recorder: Recorder, **top: Any) -> list[tuple[str, Any]]:
    return server_options(recorder, sync=True, **top)


def _cooperative(options: list[tuple[str, Any]]) -> bool:
    return Server(parse_options(options)).worker_supervisor._cooperative_children


def test_only_sync_handlers_over_plain_tcp_stop_cooperatively(tmp_path: Any) -> None:
    recorder = Recorder()
    assert _cooperative(sync_options(recorder))
    assert _cooperative(server_options())  # pywsserver.echo
    assert not _cooperative(server_options(recorder))  # ScriptedHandler.handle is async
    websocket = [
        ("handler_module", SyncRecordingHandler),
        ("resources", [("/fast", SyncRecordingHandler), ("/slow", AsyncInit)]),
    ]
    routed = [("port", 0), ("worker_options", [("protocol_modules", [("websocket", websocket)])])]
    assert not _cooperative(routed)  # one route's init is async
    in_threads = [("handler_module", threaded(SyncRecordingHandler))]
    assert not _cooperative([("port", 0), ("worker_options", [("protocol_modules", [("websocket", in_threads)])])])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert not _cooperative([("tls", context), *server_options()])
    # A module of the user's own may deliver to a handler of its own making, which the options do not show.
    modules = [("http", [("upgrade_to", "lines")]), (LineEcho, [])]
    custom = [("port", 0), ("worker_options", [("protocol_modules", modules)])]
    assert not _cooperative(custom)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cooperative_server_is_in_that_mode() -> None:
    recorder = Recorder()
    async with start_link(sync_options(recorder)) as server:
        assert server.worker_supervisor._cooperative_children
        assert server.worker_supervisor._loop_children is not None  # the mode applies to loop children


async def test_stopping_says_going_away_and_ends_once_the_peer_answers() -> None:
    recorder = Recorder()
    async with start_link(sync_options(recorder, drain_timeout=30)) as server:
        client = await RawClient.connect(server.port)
        await recorder.wait_for(lambda: recorder.open_now == 1)
        with anyio.fail_after(10):  # far below the drain timeout: the peer's answer ends the drain
            async with anyio.create_task_group() as group:
                group.start_soon(server.stop)
                event = await client.next_event()
                assert isinstance(event, CloseConnection)
                assert event.code == 1001
                # The supervisor asking again (its group stopping, say) does not cut the drain short.
                (child,) = server.worker_supervisor.which_children()
                child.id.instance.cancel()
                with anyio.move_on_after(0.3) as waited:
                    await client.next_event()
                assert waited.cancelled_caught  # the server holds the connection open for our answer
                assert recorder.closes == []
                await client.send(event.response())
    assert recorder.closes == [(0, ConnectionClose(1001, "server shutting down"))]
    await client.aclose()


# A peer that ignores going away is cut at the drain timeout: tests/test_server.py, with both kinds of handler.


async def test_stopping_during_the_handshake_answers_503() -> None:
    recorder = Recorder()
    async with start_link(sync_options(recorder, drain_timeout=5)) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head is not complete
        with anyio.fail_after(5):
            while server.worker_supervisor.count_children().active != 1:
                await anyio.lowlevel.checkpoint()
            await server.stop()
        answer = b""
        with anyio.fail_after(5):
            try:
                while True:
                    answer += await stream.receive()
            except anyio.EndOfStream:
                pass
        assert answer.startswith(b"HTTP/1.1 503")
        await stream.aclose()
    assert recorder.inits == []


async def test_terminating_one_worker_drains_it_and_leaves_the_others() -> None:
    recorder = Recorder()
    async with start_link(sync_options(recorder, drain_timeout=30)) as server:
        first = await RawClient.connect(server.port)
        second = await RawClient.connect(server.port)
        await recorder.wait_for(lambda: recorder.open_now == 2)
        handles = [info.id for info in server.worker_supervisor.which_children()]
        assert len(handles) == 2
        first_handle = next(h for h in handles if h.ref is recorder.workers[0])
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(server.worker_supervisor.terminate_child, first_handle)
                event = await first.next_event()
                assert isinstance(event, CloseConnection)
                assert event.code == 1001
                await first.send(event.response())
        assert recorder.closes_of(0) == [ConnectionClose(1001, "server shutting down")]
        assert recorder.closes_of(1) == []
        await second.send(TextMessage(data="still here"))
        event = await second.next_event()
        assert isinstance(event, TextMessage)
        assert event.data == "still here"
        await first.aclose()
        await second.aclose()


# ------------------------------------------------------------- the supervision core


class _CooperativeChild:
    """A child that stops when told through `set_stop`, and counts the calls."""

    def __init__(self) -> None:
        self.stops = 0
        self.stopped = anyio.Event()
        self.ran = 0
        self.stopped_when_given = False  # the stop came as the child gave it (asked before it ran)

    async def run(self, *, task_status: Any) -> None:
        self.ran += 1
        task_status.set_stop(self.stop)
        self.stopped_when_given = self.stops == 1
        task_status.started(self)
        await self.stopped.wait()

    def stop(self) -> None:
        self.stops += 1
        self.stopped.set()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cooperative_child_is_stopped_through_its_stop_function() -> None:
    child = _CooperativeChild()
    supervisor = Supervisor([ChildSpec("c", child.run)], strategy=Strategy.SIMPLE_ONE_FOR_ONE, name=None)
    supervisor._cooperative_children = True
    async with anyio.create_task_group() as group:
        await group.start(supervisor.run)
        handle = supervisor.start_child_soon()
        with anyio.fail_after(5):
            while child.ran == 0 or handle.ref is None:
                await anyio.lowlevel.checkpoint()
        await supervisor.terminate_child(handle)
        assert child.stops == 1
        assert supervisor.count_children().active == 0
        await supervisor.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cooperative_child_asked_to_stop_before_it_runs_is_stopped_when_it_gives_its_stop() -> None:
    child = _CooperativeChild()
    spec = ChildSpec("c", child.run, shutdown=0.5)
    supervisor = Supervisor([spec], strategy=Strategy.SIMPLE_ONE_FOR_ONE, name=None)
    supervisor._cooperative_children = True
    async with anyio.create_task_group() as group:
        await group.start(supervisor.run)
        handle = supervisor.start_child_soon()
        try:
            with anyio.fail_after(5):
                await supervisor.terminate_child(handle)  # asked before its first step
            assert child.ran == 1
            assert child.stops == 1
            assert child.stopped_when_given
            assert supervisor.count_children().active == 0
        finally:
            child.stopped.set()  # a child that missed its stop must not hold the test
        await supervisor.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cooperative_child_that_gives_no_stop_fails_to_start(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing could ever stop it: it is refused as it says it has started, and the refusal is logged."""
    started = anyio.Event()

    async def no_stop(*, task_status: Any) -> None:
        try:
            task_status.started()
        finally:
            started.set()

    supervisor = Supervisor([ChildSpec("c", no_stop)], strategy=Strategy.SIMPLE_ONE_FOR_ONE, name=None)
    supervisor._cooperative_children = True
    async with anyio.create_task_group() as group:
        await group.start(supervisor.run)
        supervisor.start_child_soon()
        with anyio.fail_after(5):
            await started.wait()
            while supervisor.which_children():  # forgotten once its start has failed
                await anyio.lowlevel.checkpoint()
        await supervisor.stop()
    assert any("gives its stop function" in repr(record.exc_info) for record in caplog.records if record.exc_info)
