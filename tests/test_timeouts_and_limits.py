"""Keepalive, idle and closing timeouts, and the bounds on what a connection may make the server hold."""

from __future__ import annotations

import socket

import anyio
import pytest
from wsproto.events import CloseConnection, Ping, TextMessage

from pywsserver import ConnectionClosed, MailboxFull, start_link

from .recorder import Recorder, server_options
from .wstools import RawClient, in_client_thread, url

pytestmark = pytest.mark.anyio


async def test_keepalive_pings_answered_keep_the_connection_and_unanswered_close_it_with_1011() -> None:
    recorder = Recorder()
    options = server_options(
        recorder, websocket=[("ping_interval", 0.1), ("ping_timeout", 0.3), ("control_messages", False)]
    )
    async with start_link(options) as server:
        client = await RawClient.connect(server.port)
        payloads = []
        for _ in range(3):  # answer three keepalive pings
            event = await client.next_event(timeout=5)
            assert isinstance(event, Ping)
            payloads.append(event.payload)
            await client.send(event.response())
        assert len(set(payloads)) == 3  # each ping carries its own payload
        await client.send(TextMessage(data="still here"))
        assert await client.next_event() == TextMessage(data="still here")
        # Stop answering: the next ping is not answered, and the server gives up.
        event = await client.next_event(timeout=5)
        assert isinstance(event, Ping)
        event = await client.next_event(timeout=5)
        assert isinstance(event, CloseConnection)
        assert event.code == 1011
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 1011
        assert "keepalive" in recorder.closes[0][1].reason
        await client.aclose()


async def test_the_websockets_client_answers_keepalive_pings_by_itself() -> None:
    options = server_options(websocket=[("ping_interval", 0.05), ("ping_timeout", 0.5)])

    async def client(address: str) -> list[str]:
        import asyncio

        from websockets.asyncio.client import connect

        async with connect(address, ping_interval=None) as ws:
            replies = []
            for index in range(10):  # about half a second: several keepalive rounds
                await ws.send(str(index))
                replies.append(str(await ws.recv()))
                await asyncio.sleep(0.05)  # paces the client; nothing waits on it
            return replies

    async with start_link(options) as server:
        assert await in_client_thread(client, url(server)) == [str(i) for i in range(10)]


async def test_an_idle_connection_is_closed_with_1001_and_activity_keeps_it_open() -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("ping_interval", None), ("idle_timeout", 0.4)])
    async with start_link(options) as server:
        active = await RawClient.connect(server.port)
        idle = await RawClient.connect(server.port)
        with anyio.fail_after(5):
            for index in range(8):  # 0.8 s of activity, a message every 0.1 s
                await active.send(TextMessage(data=str(index)))
                assert await active.next_event() == TextMessage(data=str(index))
                await anyio.sleep(0.1)  # paces the client
        event = await idle.next_event(timeout=5)
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "idle timeout")
        await active.send(TextMessage(data="alive"))
        assert await active.next_event() == TextMessage(data="alive")
        await active.aclose()
        await idle.aclose()


async def test_a_peer_that_never_answers_our_close_is_dropped_after_close_timeout() -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("close_timeout", 0.3), ("ping_interval", None)])
    async with start_link(options) as server:
        client = await RawClient.connect(server.port)
        await client.send(TextMessage(data="close:4000:bye"))
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 4000
        # We never answer; the server closes the TCP connection after close_timeout.
        assert await client.next_event(timeout=5) is None
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 4000
        await client.aclose()


# --------------------------------------------------------------------- limits


def upgraded_socket_that_never_reads(port: int) -> socket.socket:
    """A blocking socket with a small receive buffer, upgraded (the 101 is left unread)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return sock


async def test_a_peer_that_does_not_read_makes_sends_wait_and_send_nowait_fail() -> None:
    recorder = Recorder()
    options = server_options(recorder)
    options[-1] = ("worker_options", [*options[-1][1], ("mailbox_size", 8), ("write_buffer_size", 65536)])
    async with start_link(options) as server:
        sock = upgraded_socket_that_never_reads(server.port)
        try:
            await recorder.wait_for(lambda: len(recorder.workers) == 1)
            worker = recorder.workers[0]
            chunk = b"x" * 65536
            queued = 0
            for _ in range(1000):  # 64 MiB if nothing pushed back
                with anyio.move_on_after(0.5) as waited:
                    await worker.send(chunk)
                if waited.cancelled_caught:
                    break  # await send waits while the peer does not read
                queued += 1
            else:
                pytest.fail("await send never waited")
            # What the server holds: the transport buffer, the mailbox, and the kernel's socket buffers.
            assert queued * len(chunk) < 24 * 1024 * 1024, f"{queued} messages queued before send waited"
            with pytest.raises(MailboxFull):
                worker.send_nowait(chunk)
        finally:
            sock.close()
        with anyio.fail_after(5):
            await recorder.wait_for(lambda: len(recorder.closes) == 1)
        with pytest.raises(ConnectionClosed):
            await worker.send("gone")


async def test_a_peer_that_sends_fast_and_never_reads_is_pushed_back() -> None:
    """The echo server stops reading when its replies cannot be written: the client's sends block."""
    async with start_link(server_options()) as server:
        sock = upgraded_socket_that_never_reads(server.port)
        try:
            payload = b"y" * 60000
            frame = bytes((0x82, 0xFE)) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload
            sock.setblocking(False)
            sent = 0
            blocked = 0
            with anyio.fail_after(20):
                pending = memoryview(frame)
                while sent < 200 * 1024 * 1024 and blocked < 50:
                    try:
                        count = sock.send(pending)
                        sent += count
                        pending = pending[count:] or memoryview(frame)  # whole frames only
                        blocked = 0
                    except BlockingIOError:
                        blocked += 1  # the server has stopped reading: give it a moment to prove it
                        await anyio.sleep(0.01)
            assert blocked >= 50, "the server kept reading although its replies could not be written"
            assert sent < 32 * 1024 * 1024, f"the server took {sent} bytes from a peer that never reads"
            transports = [getattr(w._driver, "_transport", None) for w in server.workers()]
            buffered = [t.get_write_buffer_size() for t in transports if t is not None]
            # At most the write buffer's bound plus the replies to the messages of one read (256 KiB).
            assert all(size <= 65536 + 262144 + len(frame) for size in buffered), buffered
        finally:
            sock.close()


async def test_a_frame_announcing_a_huge_length_is_refused_with_1009_at_once() -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder, websocket=[("max_message_size", 1000)])) as server:
        client = await RawClient.connect(server.port)
        # A header announcing 2**62 bytes, then only a little data: the server does not wait for the rest.
        await client.send_raw(bytes((0x82, 0xFF)) + (1 << 62).to_bytes(8, "big") + b"\0\0\0\0" + b"z" * 100)
        event = await client.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1009
        await client.aclose()
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
