"""Process groups and broadcast, over real sockets on both backends."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, TextMessage

from pywsserver import ConnectionClose, broadcast, broadcast_threadsafe, groups, start_link
from pywsserver.protocols import encode_message
from pywsserver.supervision import GenServer, ServerRef

from .recorder import Recorder
from .test_broadcast_speedups import broadcast_path  # noqa: F401
from .wstools import RawClient, in_client_thread

pytestmark = pytest.mark.anyio


class GroupHandler:
    """Joins the group named in its options; ``bcast:x`` broadcasts x; ``close``/``raise`` end it."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        recorder: Recorder = options["recorder"]
        options["worker"].join(options["group"])
        recorder.workers.append(options["worker"])
        recorder.open_now += 1
        recorder.changed()
        return options

    def handle(self, message: Any, state: dict[str, Any]) -> Any:
        recorder: Recorder = state["recorder"]
        if isinstance(message, ConnectionClose):
            recorder.closes.append((recorder.workers.index(state["worker"]), message))
            recorder.open_now -= 1
            recorder.changed()
        elif message == "close":
            return ("close", state)
        elif message == "raise":
            raise RuntimeError("crash on purpose")
        elif isinstance(message, str) and message.startswith("bcast:"):
            broadcast(state["group"], message[6:])
        return ("noreply", state)


def group_server(recorder: Recorder, group: str, **top: Any) -> list[tuple[str, Any]]:
    worker_options: list[tuple[str, Any]] = [
        (
            "protocol_modules",
            [
                (
                    "websocket",
                    [("handler_module", GroupHandler), ("handler_options", {"recorder": recorder, "group": group})],
                )
            ],
        )
    ]
    if "mailbox_size" in top:
        worker_options.append(("mailbox_size", top.pop("mailbox_size")))
    return [("port", 0), *top.items(), ("worker_options", worker_options)]


def test_membership_basics() -> None:
    a, b = object(), object()
    groups.join("basics-1", a)
    groups.join("basics-1", b)
    groups.join("basics-1", a)
    groups.join("basics-2", a)
    assert groups.members("basics-1") == [a, b]
    assert groups.count("basics-1") == 2
    assert groups.groups_of(a) == ["basics-1", "basics-2"]
    groups.leave("basics-1", b)
    assert groups.members("basics-1") == [a]
    groups.leave_all(a)
    assert groups.members("basics-1") == []
    assert "basics-1" not in groups.which_groups()
    assert "basics-2" not in groups.which_groups()
    with pytest.raises(TypeError):
        groups.join("", a)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_a_broadcast_frame_is_a_valid_server_frame(size: int) -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(encode_message("x" * size) + encode_message(b"\x00" * size))
    events = [e for e in client.events() if isinstance(e, Message)]
    assert "".join(e.data for e in events if isinstance(e.data, str)) == "x" * size
    assert b"".join(e.data for e in events if not isinstance(e.data, str)) == b"\x00" * size


async def test_membership_follows_connections_through_every_kind_of_close() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "every-close", drain_timeout=0.5)) as server:
        clients = [await RawClient.connect(server.port) for _ in range(5)]
        await recorder.wait_for(lambda: recorder.open_now == 5)
        assert groups.count("every-close") == 5
        # the client closes
        await clients[0].send(CloseConnection(code=1000))
        await clients[0].next_event()
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert groups.count("every-close") == 4
        # the handler closes
        await clients[1].send(TextMessage(data="close"))
        event = await clients[1].next_event()
        assert isinstance(event, CloseConnection)
        await clients[1].send(event.response())
        await recorder.wait_for(lambda: len(recorder.closes) == 2)
        # the handler crashes
        await clients[2].send(TextMessage(data="raise"))
        event = await clients[2].next_event()
        assert isinstance(event, CloseConnection)
        await clients[2].send(event.response())
        await recorder.wait_for(lambda: len(recorder.closes) == 3)
        # an abrupt disconnect
        await clients[3].aclose()
        await recorder.wait_for(lambda: len(recorder.closes) == 4)
        assert groups.members("every-close") == [recorder.workers[4]]
    # the server stops
    assert groups.count("every-close") == 0
    assert "every-close" not in groups.which_groups()
    for client in clients:
        await client.aclose()


@pytest.mark.usefixtures("broadcast_path")  # the C speedups, then their twins
async def test_broadcast_reaches_everyone_exactly_once_and_in_order() -> None:
    recorder = Recorder()
    members, messages = 30, 50
    connected = threading.Event()
    async with start_link(group_server(recorder, "in-order")) as server:

        async def clients() -> list[list[Any]]:
            sockets = [await connect(f"ws://127.0.0.1:{server.port}/") for _ in range(members)]
            connected.set()
            try:
                return list(await asyncio.gather(*(_receive(ws, messages) for ws in sockets)))
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))

        async with anyio.create_task_group() as tg:
            results: list[list[list[Any]]] = []

            async def run() -> None:
                results.append(await in_client_thread(clients))

            tg.start_soon(run)
            await recorder.wait_for(lambda: recorder.open_now == members)
            for i in range(messages):
                result = broadcast("in-order", f"message {i}")
                assert (result.delivered, result.dropped) == (members, 0)
        expected = [f"message {i}" for i in range(messages)]
        assert results[0] == [expected] * members


@pytest.mark.usefixtures("broadcast_path")  # the C speedups, then their twins
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the protocol path batches; stream mode queues
async def test_a_burst_of_broadcasts_leaves_in_one_write_per_member_and_in_order() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "burst")) as server:
        clients = [await RawClient.connect(server.port) for _ in range(3)]
        await recorder.wait_for(lambda: recorder.open_now == 3)
        writes: list[tuple[int, bytes]] = []
        for index, worker in enumerate(recorder.workers):
            worker._writer = _RecordingWriter(worker._writer, index, writes)  # the transport on asyncio
        for i in range(20):
            assert broadcast("burst", f"m{i}").delivered == 3
        assert writes == []  # written when this turn of the event loop ends
        for client in clients:
            received = [await client.next_event() for _ in range(20)]
            assert [getattr(event, "data", event) for event in received] == [f"m{i}" for i in range(20)]
        assert sorted(index for index, _ in writes) == [0, 1, 2]  # one system call each
        assert {data for _, data in writes} == {b"".join(encode_message(f"m{i}") for i in range(20))}
        for client in clients:
            await client.aclose()


class _RecordingWriter:
    """Records what a worker's core writes, then writes it."""

    def __init__(self, writer: Any, index: int, writes: list[tuple[int, bytes]]) -> None:
        self._writer, self._index, self._writes = writer, index, writes

    def write(self, data: bytes) -> None:
        self._writes.append((self._index, data))
        self._writer.write(data)


async def _receive(ws: Any, count: int) -> list[Any]:
    return [await ws.recv() for _ in range(count)]


@pytest.mark.usefixtures("broadcast_path")  # the C speedups, then their twins
@pytest.mark.parametrize("policy", ["drop", "close"])
async def test_a_member_that_never_reads_does_not_delay_the_others(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="pywsserver")
    recorder = Recorder()
    messages, size = 200, 64 * 1024
    async with start_link(group_server(recorder, f"stalled-{policy}", mailbox_size=8)) as server:
        stalled = await RawClient.connect(server.port)  # never reads again
        readers = [await RawClient.connect(server.port) for _ in range(3)]
        await recorder.wait_for(lambda: recorder.open_now == 4)
        totals = {"delivered": 0, "dropped": 0, "closed": 0}
        received = [0] * len(readers)

        async def read(index: int, client: RawClient) -> None:
            while received[index] < messages:
                event = await client.next_event(timeout=20)
                assert isinstance(event, Message)
                if event.message_finished:  # wsproto hands large messages over in parts
                    received[index] += 1

        async with anyio.create_task_group() as tg:
            for index, client in enumerate(readers):
                tg.start_soon(read, index, client)
            for i in range(messages):
                result = broadcast(f"stalled-{policy}", f"{i:08d}" + "x" * (size - 8), slow=policy)  # type: ignore[arg-type]
                totals["delivered"] += result.delivered
                totals["dropped"] += result.dropped
                totals["closed"] += result.closed
                # Readers stay within 3 messages (the mailbox holds 8), as a real source produces over time.
                while min(received) < i - 2:
                    await anyio.lowlevel.checkpoint()
        assert received == [messages] * len(readers)
        if policy == "drop":
            assert totals["dropped"] > 0
            assert totals["closed"] == 0
        else:
            assert totals["closed"] == 1
            await recorder.wait_for(lambda: len(recorder.closes) == 1)
            assert recorder.closes[0][1].code == 1013
        # The warning counts every member asked, not only those the fast path handed back.
        warnings = [r.getMessage() for r in caplog.records if "could not keep up" in r.getMessage()]
        assert warnings
        assert all(" 1 of 4 members " in text for text in warnings), warnings
        for client in (stalled, *readers):
            await client.aclose()


async def test_no_membership_leaks_after_thousands_of_connects_and_disconnects() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "churn")) as server:

        async def churn() -> None:
            async def one() -> None:
                async with connect(f"ws://127.0.0.1:{server.port}/"):
                    pass

            for _ in range(40):
                await asyncio.gather(*(one() for _ in range(50)))

        await in_client_thread(churn, timeout=120)
        await recorder.wait_for(lambda: len(recorder.closes) == 2000, timeout=30)
        assert groups.count("churn") == 0
        assert "churn" not in groups.which_groups()
        assert all(groups.groups_of(worker) == [] for worker in recorder.workers)


async def test_broadcast_from_another_thread() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "threads")) as server:
        clients = [await RawClient.connect(server.port) for _ in range(3)]
        await recorder.wait_for(lambda: recorder.open_now == 3)
        result = await anyio.to_thread.run_sync(broadcast_threadsafe, "threads", "from a thread")
        assert result.delivered == 3
        for client in clients:
            event = await client.next_event()
            assert isinstance(event, TextMessage)
            assert event.data == "from a thread"
            await client.aclose()


class Listener(GenServer):
    def init(self) -> None:
        self.seen: list[Any] = []
        self.arrived = anyio.Event()

    def handle_info(self, message: Any) -> None:
        self.seen.append(message)
        self.arrived.set()


async def test_gen_servers_in_a_group_get_broadcasts_as_info_and_leave_when_they_stop() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Listener().run)
        groups.join("servers", ref)
        assert broadcast("servers", "tick").delivered == 1
        listener: Listener = ref.server  # type: ignore[assignment]
        await listener.arrived.wait()
        assert listener.seen == [("broadcast", "servers", "tick")]
        await ref.stop()
    assert groups.members("servers") == []
