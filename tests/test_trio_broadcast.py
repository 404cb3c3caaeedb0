"""Broadcast frames on the trio driver, over real sockets.

On trio a member's frame is sent from the broadcasting task at once
(`_trio_driver.TrioDriver.flush_soon`), one ``send`` per member, without the
core's general write path; what the kernel does not take waits for the
member's writer task. These tests hold that path to what the general one
guarantees: every byte, in order, and a lost connection that harms no one else.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import Message

from pywsserver import broadcast, start_link
from pywsserver._trio_driver import TrioDriver

from .recorder import Recorder
from .reliability_tools import reset
from .test_broadcast_speedups import broadcast_path  # noqa: F401  (the C speedups, then their twins)
from .test_groups import group_server
from .wstools import RawClient

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["trio"]),
    pytest.mark.usefixtures("broadcast_path"),
]


async def _whole_message(client: RawClient) -> str | bytes:
    parts: list[str | bytes] = []
    while True:
        event = await client.next_event(timeout=20)
        assert isinstance(event, Message), event
        parts.append(event.data)
        if event.message_finished:
            return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]


async def test_a_short_send_keeps_the_rest_for_the_writer_and_later_frames_follow_it_in_order() -> None:
    recorder = Recorder()
    async with start_link(group_server(recorder, "direct")) as server:
        clients = [await RawClient.connect(server.port) for _ in range(2)]
        await recorder.wait_for(lambda: recorder.open_now == 2)
        drivers = [worker._driver for worker in recorder.workers]
        assert all(type(driver) is TrioDriver for driver in drivers)
        small = [f"before {i}" for i in range(3)]
        for message in small:  # each sent whole, from this task
            assert broadcast("direct", message).delivered == 2
        assert not any(driver._pending for driver in drivers)  # type: ignore[attr-defined]
        big = "".join(f"{i:07d}\n" for i in range(2 * 1024 * 1024))  # 16 MiB: more than a socket takes
        assert broadcast("direct", big).delivered == 2
        assert all(driver._pending for driver in drivers)  # type: ignore[attr-defined]  # part sent, the rest kept
        after = [f"after {i}" for i in range(5)]
        for message in after:  # behind the kept rest
            assert broadcast("direct", message).delivered == 2
            await anyio.lowlevel.checkpoint()
        for client in clients:
            assert [await _whole_message(client) for _ in small] == small
            assert await _whole_message(client) == big
            assert [await _whole_message(client) for _ in after] == after
        for client in clients:
            await client.aclose()


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
