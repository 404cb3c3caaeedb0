"""Hostile and careless clients over loopback, in a quick form; each test checks that the server's
descriptors, workers, tasks and groups are back to their baseline afterwards, and that a normal
client is served meanwhile. (``benchmarks/stress.py`` runs the same ordeals at scale.)"""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import CloseConnection, TextMessage

from pywsserver import start_link
from pywsserver.testing import Client

from .recorder import Recorder, server_options
from .reliability_tools import UPGRADE, Baseline, masked_frame, reset
from .wstools import RawClient

pytestmark = pytest.mark.anyio


async def echo_works(port: int) -> None:
    async with await Client.connect(port) as client:
        await client.send("still serving")
        assert await client.receive() == "still serving"


async def read_until_closed(stream: anyio.abc.SocketStream, timeout: float = 10) -> bytes:
    received = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


async def test_slow_and_silent_handshakes_are_timed_out_while_a_normal_client_connects() -> None:
    options = server_options(number_of_workers=2)
    options[-1][1][0][1].append(("http", [("handshake_timeout", 0.5)]))
    async with start_link(options) as server:
        baseline = Baseline()
        silent = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(5)]
        dribbling = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(5)]

        async def dribble(stream: anyio.abc.SocketStream) -> None:
            # One byte of the request every 0.1 s: it would take 17 s to finish.
            for byte in UPGRADE:
                try:
                    await stream.send(bytes((byte,)))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
                await anyio.sleep(0.1)  # the attacker's pace

        async with anyio.create_task_group() as tg:
            for stream in dribbling:
                tg.start_soon(dribble, stream)
            await echo_works(server.port)  # served while 10 connections stall
            for stream in silent + dribbling:
                assert await read_until_closed(stream) == b""  # closed without an answer
            tg.cancel_scope.cancel()
        for stream in silent + dribbling:
            await stream.aclose()
        await baseline.assert_restored(server)


async def test_huge_fragmented_messages_close_with_1009_holding_memory_near_the_limit() -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("max_message_size", 256 * 1024)])
    async with start_link(options) as server:
        baseline = Baseline()
        client = await RawClient.connect(server.port)
        fragment = b"\0" * 65536
        sent = 0
        with anyio.fail_after(10):
            try:
                await client.send_raw(masked_frame(2, fragment, fin=False))
                for _ in range(1000):  # 64 MiB if the server never stopped us
                    await client.send_raw(masked_frame(0, fragment, fin=False))
                    sent += 1
            except (anyio.BrokenResourceError, OSError):
                pass  # the server closed on us: the rest was never taken
        event = await client.next_event()
        # The close frame may be lost to the TCP reset our unread bytes cause: the handler knows the code.
        assert event is None or (isinstance(event, CloseConnection) and event.code == 1009)
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 1009
        assert sent < 100
        await client.aclose()
        recorder.workers.clear()
        recorder.inits.clear()
        await baseline.assert_restored(server)
        await echo_works(server.port)


async def test_random_bytes_instead_of_http_and_after_the_handshake() -> None:
    chooser = random.Random(7)
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        baseline = Baseline()
        answers = []
        for _ in range(20):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(
                    bytes(chooser.randrange(256) for _ in range(chooser.randrange(1, 3000))) + b"\r\n\r\n"
                )
                answers.append(await read_until_closed(stream))
        # Garbage that is not an HTTP request gets 400 (or 431 when large), never a crash.
        assert all(answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")) for answer in answers), answers
        codes = []
        for _ in range(20):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(UPGRADE)
                await stream.send(bytes(chooser.randrange(256) for _ in range(chooser.randrange(2, 3000))))
                data = await read_until_closed(stream)
                head, _, frames = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                if frames:  # a close frame: 0x88, length, code
                    assert frames[0] == 0x88
                    codes.append(int.from_bytes(frames[2:4], "big"))
        assert set(codes) <= {1002, 1007, 1009}, codes
        assert codes  # random frames are almost always a protocol violation
        # Each handler whose init ran is told of the close (bytes in the same read as the request can
        # break the protocol before init's turn: then the handler never hears of the connection).
        await recorder.wait_for(lambda: len(recorder.closes) == len(recorder.inits))
        recorder.workers.clear()
        recorder.inits.clear()
        await baseline.assert_restored(server)
        await echo_works(server.port)


async def test_abrupt_resets_mid_message_and_a_storm_of_handshakes() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        baseline = Baseline()

        async def reset_mid_message() -> None:
            client = await RawClient.connect(server.port)
            frame = masked_frame(1, b"x" * 10_000)
            await client.send_raw(frame[:5000])  # half a frame, then a TCP reset
            await reset(client.stream)

        async def handshake_and_leave() -> None:
            client = await RawClient.connect(server.port)
            await client.aclose()

        for job in (reset_mid_message, handshake_and_leave):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(job)
        await recorder.wait_for(lambda: len(recorder.closes) == 400, timeout=20)
        assert {close.code for _, close in recorder.closes} == {1006}
        recorder.workers.clear()
        recorder.inits.clear()
        await baseline.assert_restored(server)
        await echo_works(server.port)


async def test_the_python_heap_does_not_grow_round_after_round() -> None:
    """Handshakes, echoes and resets, three rounds: what the server holds (tracemalloc) stays flat."""
    import gc
    import tracemalloc

    # No watchdog: a report (a slow loop under tracemalloc) is a log record kept by the test's capture.
    async with start_link(server_options(loop_watchdog=None)) as server:

        async def visit(kind: int) -> None:
            client = await RawClient.connect(server.port)
            if kind == 0:
                await client.send(TextMessage(data="hello"))
                assert await client.next_event() == TextMessage(data="hello")
                await client.aclose()
            else:
                await client.send_raw(masked_frame(1, b"x" * 1000)[:500])
                await reset(client.stream)

        async def one_round() -> int:
            async with anyio.create_task_group() as tg:
                for number in range(150):
                    tg.start_soon(visit, number % 2)
            with anyio.fail_after(10):
                while server.connections:
                    await anyio.lowlevel.checkpoint()
            gc.collect()
            return tracemalloc.get_traced_memory()[0]

        await one_round()  # warm up: caches, pools and lazily built tables settle
        tracemalloc.start()
        try:
            sizes = [await one_round() for _ in range(3)]
        finally:
            tracemalloc.stop()
    assert sizes[-1] - sizes[0] < 64 * 1024, sizes
