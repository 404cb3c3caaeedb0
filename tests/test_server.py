"""The server end to end over loopback, with real clients, on both anyio backends."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

import pywsserver
from pywsserver import ConnectionClose, ConnectionClosed, Server, ServerStartError, start_link
from pywsserver._asyncio_driver import ProtocolDriver
from pywsserver.supervision import Supervisor, whereis

from .recorder import Recorder, server_options
from .wstools import RawClient, in_client_thread, url

pytestmark = pytest.mark.anyio


async def test_echo_of_text_and_binary_with_the_websockets_client() -> None:
    async with start_link(server_options()) as server:

        async def client() -> list[object]:
            async with connect(url(server)) as ws:
                await ws.send("hello")
                text = await ws.recv()
                await ws.send(b"\x00\x01\xff")
                binary = await ws.recv()
                await ws.send(["frag", "men", "ted"])  # a fragmented message
                fragmented = await ws.recv()
                return [text, binary, fragmented]

        assert await in_client_thread(client) == ["hello", b"\x00\x01\xff", "fragmented"]


async def test_every_handler_return_shape_is_seen_on_the_wire() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port)
        script: list[tuple[str, type, object]] = [
            ("reply:text", TextMessage, "text"),
            ("binary:bin", BytesMessage, b"bin"),
            ("ping", Ping, b""),
            ("ping:data", Ping, b"data"),
            ("pong", Pong, b""),
            ("pong:more", Pong, b"more"),
        ]
        for command, kind, payload in script:
            await client.send(TextMessage(data=command))
            event = await client.next_event()
            assert isinstance(event, kind), (command, event)
            assert getattr(event, "data", getattr(event, "payload", None)) == payload
        await client.send(TextMessage(data="noreply"))
        await client.send(TextMessage(data="close:4001:done"))
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (4001, "done")
        await client.send(event.response())
        assert await client.next_event() is None  # the server closed the TCP connection
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes_of(0) == [ConnectionClose(4001, "done")]
        assert [m for _, m in recorder.messages][-2:] == ["noreply", "close:4001:done"]


async def test_a_plain_close_result_closes_with_1000() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:

        async def client() -> tuple[int | None, str | None]:
            async with connect(url(server)) as ws:
                await ws.send("close")
                with pytest.raises(websockets.ConnectionClosedOK) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

        assert await in_client_thread(client) == (1000, "")
        await recorder.wait_for(lambda: len(recorder.closes) == 1)


async def test_send_from_another_task_and_from_another_thread_while_the_handler_is_idle() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        received: list[object] = []
        connected = threading.Event()

        async def client() -> None:
            async with connect(url(server)) as ws:
                connected.set()
                for _ in range(3):
                    received.append(await ws.recv())

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_client_thread, client)
            await recorder.wait_for(lambda: len(recorder.workers) == 1)
            worker = recorder.workers[0]
            await pywsserver.send(worker, "from a task")
            await anyio.to_thread.run_sync(worker.send_threadsafe, b"from a thread")
            await worker.send("as a method")
        assert received == ["from a task", b"from a thread", "as a method"]
        assert recorder.messages == []  # the handler was idle throughout


async def test_sending_to_a_worker_whose_connection_is_gone_raises_connection_closed() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:

        async def client() -> None:
            async with connect(url(server)) as ws:
                await ws.send("reply:x")
                await ws.recv()

        await in_client_thread(client)
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        worker = recorder.workers[0]
        with anyio.fail_after(5):
            while worker.alive:  # the worker ends right after telling the handler
                await anyio.lowlevel.checkpoint()
        with pytest.raises(ConnectionClosed):
            await pywsserver.send(worker, "anyone there?")
        with pytest.raises(ConnectionClosed):
            await anyio.to_thread.run_sync(worker.send_threadsafe, "anyone there?")


@pytest.mark.parametrize("command", ["raise", "invalid"])
async def test_handler_crash_closes_with_1011_and_the_server_serves_on(
    command: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:

        async def client() -> tuple[int, str]:
            async with connect(url(server)) as bystander:
                await bystander.send("reply:before")
                assert await bystander.recv() == "before"
                async with connect(url(server)) as victim:
                    await victim.send(command)
                    with pytest.raises(websockets.ConnectionClosedError) as closed:
                        await victim.recv()
                await bystander.send("reply:after")
                assert await bystander.recv() == "after"
                async with connect(url(server)) as newcomer:
                    await newcomer.send("reply:new")
                    assert await newcomer.recv() == "new"
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code, closed.value.rcvd.reason

        assert await in_client_thread(client) == (1011, "internal error")
        await recorder.wait_for(lambda: len(recorder.closes) == 3)
        assert recorder.closes_of(1) == [ConnectionClose(1011, "internal error")]
    reports = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "pywsserver.worker"]
    assert len(reports) == 1
    assert "ScriptedHandler" in reports[0]
    assert "127.0.0.1:" in reports[0]
    assert ("the handler failed on purpose" in reports[0]) if command == "raise" else ("'shout'" in reports[0])


async def test_connection_close_is_told_exactly_once_however_the_connection_ends() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder, websocket=[("close_timeout", 0.5)])) as server:
        # 0: the client closes
        async def client_closes() -> None:
            async with connect(url(server)) as ws:
                await ws.send("reply:x")
                await ws.recv()

        await in_client_thread(client_closes)
        # 1: the server closes (handler result)
        raw = await RawClient.connect(server.port)
        await raw.send(TextMessage(data="close:4000:bye"))
        event = await raw.next_event()
        assert isinstance(event, CloseConnection)
        await raw.send(event.response())
        await raw.aclose()
        # 2: an abrupt disconnect, no close frame
        raw = await RawClient.connect(server.port)
        await raw.send(TextMessage(data="noreply"))
        await recorder.wait_for(lambda: len(recorder.messages) == 3)
        await raw.aclose()
        # 3: the client vanishes after our close frame (close timeout)
        raw = await RawClient.connect(server.port)
        await raw.send(TextMessage(data="close"))
        assert isinstance(await raw.next_event(), CloseConnection)
        await recorder.wait_for(lambda: len(recorder.closes) == 4)
        await raw.aclose()
    assert recorder.closes_of(0) == [ConnectionClose(1000, "")]
    assert recorder.closes_of(1) == [ConnectionClose(4000, "bye")]
    assert recorder.closes_of(2) == [ConnectionClose(1006, "connection lost")]
    assert recorder.closes_of(3) == [ConnectionClose(1000, "")]
    assert len(recorder.closes) == 4


async def test_stopping_the_server_closes_every_connection_with_1001_and_tells_each_handler() -> None:
    recorder = Recorder()
    codes: list[int] = []
    ready = threading.Event()

    async with start_link(server_options(recorder)) as server:

        async def client() -> None:
            async def one() -> None:
                async with connect(url(server)) as ws:
                    await ws.send("noreply")
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await ws.recv()
                    assert closed.value.rcvd is not None
                    codes.append(closed.value.rcvd.code)

            import asyncio

            tasks = [asyncio.ensure_future(one()) for _ in range(5)]
            ready.set()
            await asyncio.gather(*tasks)

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_client_thread, client)
            await recorder.wait_for(lambda: len(recorder.messages) == 5)
            assert server.connections == 5
            await server.stop()
        assert server.connections == 0
    assert codes == [1001] * 5
    assert sorted(c.code for _, c in recorder.closes) == [1001] * 5


async def test_a_thousand_concurrent_connections_with_ten_acceptors() -> None:
    async with start_link(server_options(number_of_workers=10)) as server:

        async def client() -> int:
            import asyncio

            sockets = [await connect(url(server)) for _ in range(1000)]
            try:
                await asyncio.gather(*(ws.send(f"hello {i}") for i, ws in enumerate(sockets)))
                answers = await asyncio.gather(*(ws.recv() for ws in sockets))
                assert answers == [f"hello {i}" for i in range(1000)]
                return server.connections
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        assert await in_client_thread(client, timeout=120) == 1000


async def test_max_connections_pauses_accepting_until_a_connection_ends() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder, max_connections=2, number_of_workers=4)) as server:
        first = await RawClient.connect(server.port)
        second = await RawClient.connect(server.port)
        async with anyio.create_task_group() as tg:
            third: list[RawClient] = []

            async def connect_third() -> None:
                third.append(await RawClient.connect(server.port))

            tg.start_soon(connect_third)
            await recorder.wait_for(lambda: recorder.open_now == 2)
            assert server.connections == 2
            await first.send(CloseConnection(code=1000))
            await first.next_event()
        await recorder.wait_for(lambda: len(recorder.workers) == 3)
        assert recorder.max_open == 2
        for client in (second, third[0]):
            await client.aclose()


async def test_the_tree_is_visible_through_the_supervision_api() -> None:
    async with start_link(server_options(number_of_workers=3, register="tree-test")) as server:
        assert whereis("tree-test") is server
        assert [c.id for c in server.supervisor.which_children()] == [
            "worker_supervisor",
            "listener",
            "acceptor_supervisor",
        ]
        assert server.acceptor_supervisor.count_children().active == 3
        client = await RawClient.connect(server.port)
        await client.send(TextMessage(data="hi"))
        assert isinstance(await client.next_event(), TextMessage)
        assert server.worker_supervisor.count_children().active == 1
        assert [w.peer for w in server.workers()] == [client.stream.extra(anyio.abc.SocketAttribute.local_address)]
        await client.aclose()
    assert whereis("tree-test") is None


async def test_the_server_runs_inside_a_users_own_tree() -> None:
    spec = pywsserver.server_child_spec(server_options(), id="websocket-server")
    async with Supervisor([spec]).running() as tree:
        (row,) = tree.which_children()
        server = row.ref
        assert isinstance(server, Server)

        async def client() -> object:
            async with connect(url(server)) as ws:
                await ws.send("inside")
                return await ws.recv()

        assert await in_client_thread(client) == "inside"


async def test_a_port_in_use_is_a_clear_start_error() -> None:
    async with start_link(server_options()) as server:
        with pytest.raises(ServerStartError, match=rf"cannot listen on 127\.0\.0\.1:{server.port}: .*in use"):
            async with start_link(server_options(port=server.port)):
                pass


async def test_bad_options_fail_at_start_link_with_their_path() -> None:
    with pytest.raises(pywsserver.OptionError, match=r"^worker_options\.protocol_modules\.websocket\.handler_module"):
        async with start_link([("worker_options", [("protocol_modules", [("websocket", [("handler_module", 1)])])])]):
            pass


async def test_no_task_outlives_the_server() -> None:
    baseline = len(anyio.get_running_tasks())
    recorder = Recorder()
    # The raw clients never answer the 1001 close: the drain timeout cancels what is left.
    async with start_link(server_options(recorder, drain_timeout=0.2)) as server:
        clients = [await RawClient.connect(server.port) for _ in range(3)]
        await recorder.wait_for(lambda: recorder.open_now == 3)
        assert len(anyio.get_running_tasks()) > baseline
    assert len(anyio.get_running_tasks()) == baseline
    for client in clients:
        await client.aclose()


async def test_a_crashed_listener_restarts_with_the_acceptors_and_connections_keep_working() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        port = server.port
        established = await RawClient.connect(port)
        old_listener = server._listeners[0]
        server._listener_broken.set()  # what an acceptor does when accept() fails for good
        with anyio.fail_after(5):
            while server._listeners[0] is old_listener or server.acceptor_supervisor.count_children().active == 0:
                await anyio.lowlevel.checkpoint()
        assert server.port == port
        await established.send(TextMessage(data="reply:still here"))
        event = await established.next_event()
        assert isinstance(event, TextMessage)
        assert event.data == "still here"
        newcomer = await RawClient.connect(port)
        await newcomer.send(TextMessage(data="reply:new"))
        assert isinstance(await newcomer.next_event(), TextMessage)
        assert server.supervisor.restart_count == 1
        assert recorder.closes == []
        for client in (established, newcomer):
            await client.aclose()


async def test_crashes_faster_than_the_intensity_allows_stop_the_server_and_reach_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pywsserver import RestartIntensityExceeded

    recorder = Recorder()
    with pytest.raises(RestartIntensityExceeded) as caught:
        async with start_link(server_options(recorder, number_of_workers=1, drain_timeout=0.5)) as server:
            client = await RawClient.connect(server.port)
            await recorder.wait_for(lambda: recorder.open_now == 1)

            async def broken_accept(listener: object, lock: object) -> object:
                raise RuntimeError("accept is broken for good")

            monkeypatch.setattr(server, "_accept", broken_accept)
            await server.acceptor_supervisor.terminate_child(("acceptor", 0))
            await server.acceptor_supervisor.restart_child(("acceptor", 0))
            await anyio.sleep_forever()
    assert caught.value.child_id == "acceptor_supervisor"
    event = await client.next_event()  # the established connection was closed as the server went down
    assert isinstance(event, CloseConnection)
    assert event.code == 1001
    await recorder.wait_for(lambda: len(recorder.closes) == 1)
    await client.aclose()


@pytest.mark.parametrize("sync", [False, True], ids=["async handler", "sync handler"])
async def test_connections_that_ignore_the_going_away_close_are_cut_at_the_drain_timeout(sync: bool) -> None:
    """Every handler is told 1001, sync or async (a sync one's workers stop cooperatively on asyncio)."""
    recorder = Recorder()
    async with start_link(server_options(recorder, sync=sync, drain_timeout=0.2)) as server:
        silent = await RawClient.connect(server.port)
        await recorder.wait_for(lambda: recorder.open_now == 1)
        with anyio.fail_after(5):
            await server.stop()
    event = await silent.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1001
    assert await silent.next_event() is None  # then the server cut the TCP connection
    assert recorder.closes == [(0, ConnectionClose(1001, "server shutting down"))]
    await silent.aclose()


async def test_accepted_connections_send_without_nagle_delay() -> None:
    import socket

    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port)
        await recorder.wait_for(lambda: recorder.open_now == 1)
        worker = server.workers()[0]
        driver: Any = worker._driver
        if isinstance(driver, ProtocolDriver):  # asyncio: the driver's transport
            sock = driver._transport.get_extra_info("socket")
        elif hasattr(driver, "_sock"):  # trio: the trio driver's own socket
            sock = driver._sock
        else:
            sock = driver._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await client.aclose()
