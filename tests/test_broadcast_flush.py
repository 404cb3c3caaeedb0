"""Broadcast frames written at the end of the event-loop turn, over real sockets.

On asyncio's default loop the frames gathered in a turn leave through the
socket directly when the transport buffers nothing (`_asyncio_driver._LoopShared.flush`);
a short send hands the rest to the transport, which buffers it as its own
``write`` would. These tests hold that path to what the transport's ``write``
guarantees: every byte, in order, and a lost connection that harms no one else.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import Message

from pywsserver import broadcast, start_link

from .recorder import Recorder
from .reliability_tools import reset
from .test_broadcast_speedups import broadcast_path  # noqa: F401  (the C speedups, then their twins)
from .test_groups import group_server
from .wstools import RawClient

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("broadcast_path")]


async def _whole_message(client: RawClient) -> str | bytes:
    parts: list[str | bytes] = []
    while True:
        event = await client.next_event(timeout=20)
        assert isinstance(event, Message), event
        parts.append(event.data)
        if event.message_finished:
            return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_frames_go_to_the_socket_directly_and_a_short_send_leaves_the_rest_buffered_in_order() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "direct")) as server:
        clients = [await RawClient.connect(server.port) for _ in range(2)]
        await recorder.wait_for(lambda: recorder.open_now == 2)
        for worker in recorder.workers:
            # The shortcut is in use on this loop (if a Python release renames the transport's
            # attributes it reads, every write takes transport.write and this fails).
            assert worker._driver._plain is worker._writer  # type: ignore[attr-defined]
        big = "".join(f"{i:07d}\n" for i in range(2 * 1024 * 1024))  # 16 MiB: more than a socket takes
        assert broadcast("direct", big).delivered == 2
        transports = [worker._writer for worker in recorder.workers]
        with anyio.fail_after(10):
            while any(transport.get_write_buffer_size() == 0 for transport in transports):  # type: ignore[attr-defined]
                await anyio.lowlevel.checkpoint()  # the turn's flush: part sent, the rest buffered
        small = [f"after {i}" for i in range(5)]
        for message in small:  # behind the buffered rest (through the mailbox while writing is paused)
            assert broadcast("direct", message).delivered == 2
            await anyio.lowlevel.checkpoint()
        for client in clients:
            assert await _whole_message(client) == big
            assert [await _whole_message(client) for _ in small] == small
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_member_reset_by_its_peer_does_not_keep_the_frame_from_the_others() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "reset")) as server:
        doomed = await RawClient.connect(server.port)
        others = [await RawClient.connect(server.port) for _ in range(2)]
        await recorder.wait_for(lambda: recorder.open_now == 3)
        await reset(doomed.stream)  # the server's next send on it fails, or it sees the loss first
        for i in range(20):
            broadcast("reset", f"m{i}")
            await anyio.lowlevel.checkpoint()
        for client in others:
            assert [await _whole_message(client) for _ in range(20)] == [f"m{i}" for i in range(20)]
        await recorder.wait_for(lambda: recorder.open_now == 2)
        for client in others:
            await client.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_burst_gathers_every_frame_on_each_member_once_for_one_send_and_arrives_in_order() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "burst-direct")) as server:
        clients = [await RawClient.connect(server.port) for _ in range(3)]
        await recorder.wait_for(lambda: recorder.open_now == 3)
        workers = recorder.workers
        for i in range(20):
            assert broadcast("burst-direct", f"m{i}").delivered == 3
        # Until the turn ends: every frame gathered on each member, each member once on the loop's
        # list, which the flush sends with one ``send`` per member.
        assert [len(worker._out) for worker in workers] == [20, 20, 20]
        assert workers[0]._flushes == workers
        for client in clients:
            assert [await _whole_message(client) for _ in range(20)] == [f"m{i}" for i in range(20)]
        for client in clients:
            await client.aclose()
