"""`SocketTransport`, the asyncio driver's own plain-TCP transport, over real loopback sockets.

Each test drives the transport on the running asyncio loop with a recording protocol in place of
the driver (`RecordingProtocol`), and plays the peer itself through the other end of a loopback TCP
connection. Waits are on conditions, bounded in time (`RecordingProtocol.wait_for`, `recv_exactly`)
or in loop turns (`turns`); nothing sleeps for a delay.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import logging
import random
import select
import selectors
import socket
import struct
import weakref
from asyncio import trsock
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import pytest

from pywsserver._socket_transport import SocketTransport

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

TIMEOUT = 5.0
#: Asked of the kernel for both buffers of both ends when a test needs writes to back up (Linux
#: doubles it, and has a floor of about 4.5 KiB).
SMALL_BUFFER = 4096
CHUNK = 4096


class RecordingProtocol:
    """What the transport calls, in order; holds its transport, as the driver does."""

    def __init__(self, view_size: int = 65536, keep_open: bool = False) -> None:
        self.view = memoryview(bytearray(view_size))
        self.received = bytearray()
        self.calls: list[tuple[str, Any]] = []
        self.keep_open = keep_open
        self.transport: SocketTransport | None = None
        self._changed = asyncio.Event()

    def _record(self, name: str, value: Any = None) -> None:
        self.calls.append((name, value))
        self._changed.set()

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.view[:nbytes]
        self._record("data", nbytes)

    def eof_received(self) -> bool:
        self._record("eof")
        return self.keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        self._record("lost", exc)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self._record("pause_writing", self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        assert self.transport is not None
        self._record("resume_writing", self.transport.get_write_buffer_size())

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def values(self, name: str) -> list[Any]:
        return [value for called, value in self.calls if called == name]

    @property
    def lost(self) -> bool:
        return "lost" in self.names()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Connection(NamedTuple):
    transport: SocketTransport
    protocol: RecordingProtocol
    ours: socket.socket  # the transport's socket (accepted, as a server's is)
    peer: socket.socket


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair, both ends non-blocking: (the accepted end, the connecting end).

    ``small``: both ends' kernel buffers as small as can be, so that writes back up soon.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for sock in (listener, peer):  # the accepted socket inherits the listener's
            if small:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer.connect(listener.getsockname())
        ours, _ = listener.accept()
    except BaseException:
        peer.close()
        raise
    finally:
        listener.close()
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


@contextlib.asynccontextmanager
async def connection(*, small: bool = False, view_size: int = 65536, **high: int) -> AsyncIterator[Connection]:
    """A transport on the running loop over a fresh pair; aborted (if still open) and both sockets closed after."""
    ours, peer = tcp_pair(small)
    try:
        protocol = RecordingProtocol(view_size)
        transport = make(ours, protocol, **high)
        try:
            yield Connection(transport, protocol, ours, peer)
        finally:
            if not protocol.lost:  # leave nothing registered with the loop's selector
                transport.abort()
                await protocol.wait_for(lambda: protocol.lost)
    finally:
        ours.close()
        peer.close()


def make(sock: socket.socket, protocol: RecordingProtocol, **high: int) -> SocketTransport:
    """A transport for ``sock`` on the running loop, as the driver makes it (the loop's selector from
    `SocketTransport.selector_of`)."""
    loop = asyncio.get_running_loop()
    selector = SocketTransport.selector_of(loop)
    assert selector is not None
    transport = SocketTransport(loop, selector, sock, protocol, protocol.view, **high)  # type: ignore[arg-type]
    protocol.transport = transport
    return transport


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes whose order shows: any loss, duplicate or swap is seen when compared."""
    return random.Random(seed).randbytes(size)


def fill(transport: SocketTransport, data: bytes, more_chunks: int = 4) -> int:
    """Write ``data`` chunk by chunk until the transport buffers some, then ``more_chunks`` chunks
    more (to a peer that does not read); the number of bytes written."""
    written = 0
    while transport.get_write_buffer_size() == 0:
        assert written + (more_chunks + 1) * CHUNK <= len(data), "the socket took everything"
        transport.write(data[written : written + CHUNK])
        written += CHUNK
    for _ in range(more_chunks):
        transport.write(data[written : written + CHUNK])
        written += CHUNK
    return written


def wait_readable(sock: socket.socket) -> None:
    """Until the kernel has something for ``sock`` to read (bytes, EOF or a reset), without taking it."""
    readable, _, _ = select.select([sock], [], [], TIMEOUT)
    assert readable, "nothing arrived"


async def turns(count: int = 10) -> None:
    """Let the loop turn ``count`` times (each turn polls the selector)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def recv_exactly(peer: socket.socket, size: int) -> bytes:
    """What the peer reads until it has ``size`` bytes (or the end of the stream)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while len(data) < size:
            chunk = await loop.sock_recv(peer, 65536)
            if not chunk:
                break
            data += chunk
    return bytes(data)


async def recv_until_eof(peer: socket.socket) -> bytes:
    """What the peer reads until the end of the stream."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while chunk := await loop.sock_recv(peer, 65536):
            data += chunk
    return bytes(data)


def reset(peer: socket.socket) -> None:
    """Close ``peer`` with a reset (SO_LINGER 0) rather than a FIN."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


# ------------------------------------------------------------------------------------- creation


async def test_made_on_the_default_loop_it_is_registered_for_reading_at_once() -> None:
    """On asyncio's default (selector) loop `SocketTransport.selector_of` gives the loop's selector,
    and a transport made with it is registered there for reading at once (no loop turn), its write
    bounds ``high`` and a quarter of it."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
    selector = SocketTransport.selector_of(loop)
    assert selector is loop._selector  # type: ignore[attr-defined]
    ours, peer = tcp_pair()
    try:
        protocol = RecordingProtocol()
        fd = ours.fileno()
        transport = SocketTransport(loop, selector, ours, protocol, protocol.view, high=4096)  # type: ignore[arg-type]
        try:
            key = selector.get_key(fd)
            assert key.events == selectors.EVENT_READ
            assert transport.get_write_buffer_limits() == (1024, 4096)
            assert transport.is_reading()
            assert not transport.is_closing()
            assert transport.get_protocol() is protocol
            assert transport.get_write_buffer_size() == 0
            assert protocol.calls == []
        finally:
            transport.abort()
            await protocol.wait_for(lambda: protocol.lost)
        with pytest.raises(KeyError):  # and unregistered once lost
            selector.get_key(fd)
    finally:
        ours.close()
        peer.close()


async def test_a_stale_registration_of_its_descriptor_number_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    """A descriptor closed while still registered leaves the selector an entry that the kernel has
    forgotten; a transport whose socket gets that number registers it anew and reads."""
    loop = asyncio.get_running_loop()
    selector = SocketTransport.selector_of(loop)
    assert selector is not None
    gone, gone_peer = tcp_pair()
    stale = gone.fileno()
    selector.register(stale, selectors.EVENT_READ, (asyncio.Handle(lambda: None, (), loop, None), None))
    gone.close()  # still in the selector's map
    gone_peer.close()
    ours, peer = tcp_pair()
    try:
        if ours.fileno() != stale:
            selector.unregister(stale)
            pytest.skip("the descriptor number was not reused")
        protocol = RecordingProtocol()
        transport = SocketTransport(loop, selector, ours, protocol, protocol.view)  # type: ignore[arg-type]
        try:
            peer.sendall(b"after the stale entry")
            await protocol.wait_for(lambda: len(protocol.received) >= 21)
            assert bytes(protocol.received) == b"after the stale entry"
            assert f"descriptor {stale} was still registered" in caplog.text
        finally:
            transport.abort()
            await protocol.wait_for(lambda: protocol.lost)
    finally:
        ours.close()
        peer.close()


async def test_selector_of_is_none_off_asyncios_selector_loop() -> None:
    """`SocketTransport.selector_of` is None (the driver then takes asyncio's transport) for what is
    not a selector event loop, and for a selector event loop without a selector it can use."""
    assert SocketTransport.selector_of(object()) is None  # type: ignore[arg-type]
    other = asyncio.SelectorEventLoop()
    selector = other._selector  # type: ignore[attr-defined]
    try:
        assert SocketTransport.selector_of(other) is selector
        other._selector = None  # type: ignore[attr-defined]
        assert SocketTransport.selector_of(other) is None
    finally:
        other._selector = selector  # type: ignore[attr-defined]
        other.close()


async def test_selector_of_is_none_on_a_loop_that_dispatches_events_its_own_way() -> None:
    """A selector loop whose ``_process_events`` is its own may not expect the ``(reader, writer)``
    handles the transport registers: it is left its own transport."""

    class OwnDispatch(asyncio.SelectorEventLoop):  # type: ignore[misc, valid-type]
        def _process_events(self, event_list: Any) -> None:
            super()._process_events(event_list)

    other = OwnDispatch()
    try:
        assert SocketTransport.selector_of(other) is None
    finally:
        other.close()


async def test_write_takes_bytes_like_objects_only_and_counts_bytes() -> None:
    """``write`` refuses a ``str`` with asyncio's TypeError, and a memoryview whose items are wider
    than a byte is sent byte for byte."""
    async with connection() as (transport, _protocol, _, peer):
        with pytest.raises(TypeError, match="bytes-like"):
            transport.write("text")  # type: ignore[arg-type]
        numbers = array.array("i", range(1000))
        transport.write(memoryview(numbers))
        assert await recv_exactly(peer, len(numbers) * numbers.itemsize) == numbers.tobytes()
        assert not transport.is_closing()


async def test_selector_of_is_none_on_uvloop() -> None:
    """`SocketTransport.selector_of` is None for a uvloop loop (the driver then takes uvloop's transport)."""
    uvloop = pytest.importorskip("uvloop")
    other = uvloop.new_event_loop()
    try:
        assert SocketTransport.selector_of(other) is None
    finally:
        other.close()


# -------------------------------------------------------------------------------- reads and writes


async def test_bytes_arrive_in_order_both_ways() -> None:
    """What the peer sends reaches ``buffer_updated`` in order, read into the view the transport was given
    (here smaller than what is sent, so over many reads); what is written (``write``, ``writelines``)
    reaches the peer in order."""
    loop = asyncio.get_running_loop()
    async with connection(view_size=1000) as (transport, protocol, _, peer):
        incoming = payload(300_000, seed=1)
        await asyncio.wait_for(loop.sock_sendall(peer, incoming), TIMEOUT)
        await protocol.wait_for(lambda: len(protocol.received) >= len(incoming))
        assert bytes(protocol.received) == incoming
        assert len(protocol.values("data")) >= len(incoming) // 1000
        assert all(0 < nbytes <= 1000 for nbytes in protocol.values("data"))

        outgoing = payload(300_000, seed=2)
        sizes = [1, 2, 3, 1000, 4096, 65536, 100_000]
        offset = 0
        for size in sizes:
            transport.write(outgoing[offset : offset + size])
            offset += size
        transport.writelines([outgoing[offset : offset + 10], bytearray(outgoing[offset + 10 : offset + 20])])
        offset += 20
        transport.write(memoryview(outgoing)[offset:])
        assert await recv_exactly(peer, len(outgoing)) == outgoing
        assert set(protocol.names()) <= {"data", "pause_writing", "resume_writing"}


async def test_write_buffering_and_flow_control() -> None:
    """Past what the socket takes writes are buffered, in order; ``pause_writing`` comes once, as the
    buffer goes above ``high``; ``resume_writing`` once, as soon as the peer's reads bring it down to
    ``low`` or below (never before); the peer gets every byte once, in order."""
    loop = asyncio.get_running_loop()
    high, low = 32768, 16384
    async with connection(small=True) as (transport, protocol, _, peer):
        transport.set_write_buffer_limits(high=high, low=low)
        assert transport.get_write_buffer_limits() == (low, high)
        data = payload(4 * 1024 * 1024, seed=3)
        written = 0
        while not protocol.values("pause_writing"):
            assert written + CHUNK <= len(data), "never paused"
            before = transport.get_write_buffer_size()
            assert before <= high  # not paused below it
            transport.write(data[written : written + CHUNK])
            written += CHUNK
            if before:  # once bytes are buffered, a write joins them: it does not send ahead of them
                assert transport.get_write_buffer_size() == before + CHUNK
        (at_pause,) = protocol.values("pause_writing")
        assert at_pause > high
        assert at_pause == transport.get_write_buffer_size()
        assert written > at_pause  # the socket took the rest
        for _ in range(4):  # more while paused: buffered, no second pause
            transport.write(data[written : written + CHUNK])
            written += CHUNK
        assert transport.get_write_buffer_size() == at_pause + 4 * CHUNK
        assert protocol.names() == ["pause_writing"]

        received = bytearray()
        async with asyncio.timeout(TIMEOUT):
            while len(received) < written:  # read a little at a time: the buffer drains by steps
                chunk = await loop.sock_recv(peer, 1024)
                assert chunk, "the end of the stream came early"
                received += chunk
                size = transport.get_write_buffer_size()
                # Each turn that shrinks the buffer resumes the protocol as soon as it is down to low:
                assert ("resume_writing" in protocol.names()) == (size <= low), (size, protocol.calls)
        assert received == data[:written]
        assert transport.get_write_buffer_size() == 0
        assert protocol.names() == ["pause_writing", "resume_writing"]
        (at_resume,) = protocol.values("resume_writing")
        assert at_resume <= low
        assert transport.is_reading()
        assert not transport.is_closing()
        transport.close()
        assert await recv_until_eof(peer) == b""  # and nothing more


async def test_a_write_while_bytes_are_buffered_goes_after_them() -> None:
    """A write while bytes are buffered joins the buffer even when the socket has room again before
    the loop has turned (the transport has not written its buffer yet): it is not sent ahead of them."""
    async with connection(small=True, high=1 << 30) as (transport, _, ours, peer):
        data = payload(4 * 1024 * 1024, seed=9)
        written = fill(transport, data)
        buffered = transport.get_write_buffer_size()
        received = bytearray()
        with contextlib.suppress(BlockingIOError):  # the peer reads what has come, the loop not turning
            while chunk := peer.recv(65536):
                received += chunk
        assert received
        _, writable, _ = select.select([], [ours], [], TIMEOUT)
        assert writable, "no room"
        transport.write(data[written : written + 10])
        written += 10
        assert transport.get_write_buffer_size() == buffered + 10
        received += await recv_exactly(peer, written - len(received))
        assert received == data[:written]


async def test_write_eof_after_buffered_bytes() -> None:
    """``write_eof`` with bytes buffered: the peer gets them all, then the end of the stream; writing
    after it raises; the transport still reads."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, _, peer):
        data = payload(4 * 1024 * 1024, seed=4)
        written = fill(transport, data)
        assert transport.can_write_eof()
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"after eof")
        assert await recv_until_eof(peer) == data[:written]
        assert transport.get_write_buffer_size() == 0
        assert transport.is_reading()
        peer.send(b"still reading")
        await protocol.wait_for(lambda: len(protocol.received) >= 13)
        assert protocol.received == b"still reading"
        assert not protocol.lost


# -------------------------------------------------------------------------------------- the end


async def test_close_writes_what_is_buffered_then_loses_the_connection() -> None:
    """``close`` with bytes buffered: no read after it (bytes the peer sends are left in the socket),
    the buffer is all written, then ``connection_lost(None)`` once and the socket is closed."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, ours, peer):
        data = payload(4 * 1024 * 1024, seed=5)
        written = fill(transport, data)
        assert peer.send(b"late") == 4
        wait_readable(ours)  # there to be read, before the loop turns again
        transport.close()
        assert transport.is_closing()
        assert not transport.is_reading()
        transport.close()  # a second close does nothing
        await turns()
        assert protocol.calls == []  # not read, and not lost while bytes are buffered
        assert transport.get_write_buffer_size() > 0
        # Taken here, so that the socket's close is an orderly one (unread bytes make it a reset):
        assert ours.recv(16) == b"late"
        assert await recv_until_eof(peer) == data[:written]
        assert protocol.calls == [("lost", None)]
        assert ours.fileno() == -1
        assert transport.get_protocol() is None
        await turns()
        assert protocol.calls == [("lost", None)]


async def test_close_with_nothing_buffered_loses_the_connection_in_a_callback() -> None:
    """``close`` with nothing buffered: ``connection_lost(None)`` in a later callback, once; the peer
    sees the end of the stream."""
    async with connection() as (transport, protocol, ours, peer):
        transport.close()
        assert protocol.calls == []
        await protocol.wait_for(lambda: protocol.lost)
        assert protocol.calls == [("lost", None)]
        assert ours.fileno() == -1
        assert await recv_until_eof(peer) == b""
        transport.close()
        transport.abort()
        await turns()
        assert protocol.calls == [("lost", None)]


@pytest.mark.parametrize("action", ["close", "pause_reading"])
async def test_a_read_queued_in_the_turn_of_close_or_pause_is_not_delivered(action: str) -> None:
    """A read event already queued when ``close``/``pause_reading`` runs earlier in the same loop turn
    delivers nothing (the selector reported the socket readable in that turn)."""
    loop = asyncio.get_running_loop()
    async with connection() as (transport, protocol, ours, peer):
        assert peer.send(b"queued") == 6
        wait_readable(ours)
        # Runs first in the next turn, before the read callback that turn's poll queues:
        loop.call_soon(getattr(transport, action))
        await turns()
        assert "data" not in protocol.names()
        if action == "close":
            assert protocol.calls == [("lost", None)]
            return
        transport.resume_reading()
        await protocol.wait_for(lambda: len(protocol.received) >= 6)
        assert protocol.received == b"queued"


async def test_close_from_resume_writing_once_the_buffer_is_written() -> None:
    """``close`` called from ``resume_writing`` as the buffer empties (``low`` 0): the connection is
    lost once (the transport's own end of the buffer and the close's callback do not both call it)."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, ours, peer):
        transport.set_write_buffer_limits(high=8192, low=0)
        resume = protocol.resume_writing

        def resume_and_close() -> None:
            resume()
            assert transport.get_write_buffer_size() == 0
            transport.close()

        protocol.resume_writing = resume_and_close  # type: ignore[method-assign]
        data = payload(4 * 1024 * 1024, seed=10)
        written = fill(transport, data)
        assert protocol.names() == ["pause_writing"]
        assert await recv_until_eof(peer) == data[:written]
        await turns()
        assert protocol.calls[1:] == [("resume_writing", 0), ("lost", None)]
        assert ours.fileno() == -1


async def test_an_error_writing_from_resume_writing_reaches_connection_lost() -> None:
    """A write from ``resume_writing`` (called as ``_write_ready`` emptied the buffer) that fails
    because the peer reset the connection ends in ``connection_lost`` with that ``OSError``."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, ours, peer):
        transport.set_write_buffer_limits(high=8192, low=0)
        resume = protocol.resume_writing

        def resume_and_write() -> None:
            resume()
            reset(peer)
            wait_readable(ours)  # the reset arrived
            transport.write(b"to a reset peer")

        protocol.resume_writing = resume_and_write  # type: ignore[method-assign]
        fill(transport, payload(4 * 1024 * 1024, seed=11))
        for _ in range(100_000):  # the peer reads what comes, the loop turning between its reads
            if "resume_writing" in protocol.names():
                break
            with contextlib.suppress(BlockingIOError):
                peer.recv(65536)
            await asyncio.sleep(0)
        else:
            pytest.fail("resume_writing never came")
        await protocol.wait_for(lambda: protocol.lost)
        await turns()
        assert protocol.names() == ["pause_writing", "resume_writing", "lost"]
        assert isinstance(protocol.calls[-1][1], OSError), protocol.calls


async def test_abort_drops_the_buffer_and_loses_the_connection_in_a_callback() -> None:
    """``abort`` with bytes buffered: they are dropped (the peer gets only what the socket had taken),
    ``connection_lost(None)`` comes in a later callback, not inside ``abort``, once."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, ours, peer):
        data = payload(4 * 1024 * 1024, seed=6)
        written = fill(transport, data)
        taken = written - transport.get_write_buffer_size()
        transport.abort()
        assert protocol.calls == []  # not yet
        assert transport.get_write_buffer_size() == 0
        assert transport.is_closing()
        assert not transport.is_reading()
        await protocol.wait_for(lambda: protocol.lost)
        assert protocol.calls == [("lost", None)]
        assert ours.fileno() == -1
        assert await recv_until_eof(peer) == data[:taken]
        transport.abort()
        transport.close()
        await turns()
        assert protocol.calls == [("lost", None)]


async def test_the_peers_eof_closes_the_transport() -> None:
    """The peer's end of the stream: ``eof_received`` after the bytes before it; as it returns False the
    transport closes and ``connection_lost(None)`` follows; the peer then sees the end of the stream."""
    async with connection() as (transport, protocol, ours, peer):
        assert peer.send(b"bye") == 3
        peer.shutdown(socket.SHUT_WR)
        await protocol.wait_for(lambda: protocol.lost)
        assert protocol.received == b"bye"
        assert [name for name in protocol.names() if name != "data"] == ["eof", "lost"]
        assert protocol.calls[-1] == ("lost", None)
        assert ours.fileno() == -1
        assert transport.is_closing()
        assert await recv_until_eof(peer) == b""


async def test_the_peers_eof_kept_open_by_the_protocol() -> None:
    """If ``eof_received`` returns True the transport stays open for writing and stops reading."""
    async with connection() as (transport, protocol, _, peer):
        protocol.keep_open = True
        peer.shutdown(socket.SHUT_WR)
        await protocol.wait_for(lambda: "eof" in protocol.names())
        await turns()
        assert protocol.names() == ["eof"]
        assert not transport.is_reading()
        assert not transport.is_closing()
        transport.write(b"after your eof")
        assert await recv_exactly(peer, 14) == b"after your eof"
        transport.close()
        await protocol.wait_for(lambda: protocol.lost)
        assert protocol.calls == [("eof", None), ("lost", None)]


async def test_the_peers_eof_kept_open_is_reported_once() -> None:
    """After ``eof_received`` returned True, ``resume_reading`` does not report the end of the stream again."""
    async with connection() as (transport, protocol, _, peer):
        protocol.keep_open = True
        peer.shutdown(socket.SHUT_WR)
        await protocol.wait_for(lambda: "eof" in protocol.names())
        transport.resume_reading()
        await turns()
        assert protocol.names() == ["eof"]


# -------------------------------------------------------------------------------- reading paused


async def test_pause_and_resume_reading() -> None:
    """``pause_reading`` stops ``buffer_updated`` (what the peer sends meanwhile waits in the socket),
    ``resume_reading`` delivers it; ``is_reading`` follows; a second pause or resume does nothing."""
    async with connection() as (transport, protocol, ours, peer):
        assert transport.is_reading()
        transport.pause_reading()
        transport.pause_reading()
        assert not transport.is_reading()
        assert peer.send(b"while paused") == 12
        wait_readable(ours)
        await turns()
        assert protocol.calls == []
        transport.resume_reading()
        transport.resume_reading()
        assert transport.is_reading()
        await protocol.wait_for(lambda: len(protocol.received) >= 12)
        assert protocol.received == b"while paused"
        assert set(protocol.names()) == {"data"}


# ------------------------------------------------------------------------------ a lost connection


async def test_a_write_after_the_connection_is_lost_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Writes after the connection is lost raise nothing and send nothing; from the fifth on each is
    logged, as asyncio's transport does."""
    async with connection() as (transport, protocol, _, peer):
        transport.abort()
        await protocol.wait_for(lambda: protocol.lost)
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            for count in range(1, 11):
                transport.write(b"ignored")
                logged = [record for record in caplog.records if record.name == "asyncio"]
                assert len(logged) == max(0, count - 4)
        assert logged[0].getMessage() == "socket.send() raised exception."
        assert transport.get_write_buffer_size() == 0
        assert await recv_until_eof(peer) == b""
        assert protocol.calls == [("lost", None)]


async def test_a_write_to_a_peer_that_reset_ends_in_connection_lost_with_the_error() -> None:
    """A write to a peer that reset the connection raises nothing; ``connection_lost`` follows, in a
    callback, with the ``OSError``."""
    async with connection() as (transport, protocol, ours, peer):
        transport.pause_reading()  # so that the write, not a read, meets the reset
        reset(peer)
        wait_readable(ours)  # the reset arrived
        transport.write(b"to a reset peer")
        assert protocol.calls == []
        await protocol.wait_for(lambda: protocol.lost)
        ((name, exc),) = protocol.calls
        assert name == "lost"
        assert isinstance(exc, OSError), exc
        assert ours.fileno() == -1
        transport.write(b"ignored")


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "paused"])
async def test_buffered_bytes_to_a_peer_that_resets_end_in_connection_lost_with_the_error(reading: bool) -> None:
    """Bytes buffered for a peer that then resets (SO_LINGER 0, with bytes unread): the transport
    drops them and ``connection_lost`` gets the ``OSError`` (seen by a read, or by the buffer's
    write when reading is paused)."""
    async with connection(small=True, high=1 << 30) as (transport, protocol, ours, peer):
        fill(transport, payload(4 * 1024 * 1024, seed=7))
        if not reading:
            transport.pause_reading()
        reset(peer)
        await protocol.wait_for(lambda: protocol.lost)
        ((name, exc),) = protocol.calls
        assert name == "lost"
        assert isinstance(exc, OSError), exc
        assert transport.get_write_buffer_size() == 0
        assert ours.fileno() == -1


# ------------------------------------------------------------------------------------- the rest


async def test_get_extra_info() -> None:
    """``peername`` and ``sockname`` are the socket's addresses (kept once looked up), ``socket`` a
    `TransportSocket` of it; an unknown name gives the default."""
    async with connection() as (transport, protocol, ours, peer):
        assert transport.get_extra_info("peername") == peer.getsockname() == ours.getpeername()
        assert transport.get_extra_info("sockname") == peer.getpeername() == ours.getsockname()
        wrapped = transport.get_extra_info("socket")
        assert isinstance(wrapped, trsock.TransportSocket)
        assert wrapped.fileno() == ours.fileno()
        assert transport.get_extra_info("no such thing") is None
        assert transport.get_extra_info("no such thing", "default") == "default"
        peername, sockname = peer.getsockname(), peer.getpeername()
        transport.abort()
        await protocol.wait_for(lambda: protocol.lost)
        assert transport.get_extra_info("peername") == peername
        assert transport.get_extra_info("sockname") == sockname
        assert transport.get_extra_info("no such thing", 1) == 1


async def test_set_write_buffer_limits_checks_its_bounds() -> None:
    """``set_write_buffer_limits`` rejects ``low > high`` (and ``low < 0``) with ValueError, keeping
    the bounds it had; otherwise asyncio's defaults (64 KiB, a quarter of ``high``, four times ``low``)."""
    async with connection() as (transport, _, _, _):
        transport.set_write_buffer_limits(high=100, low=50)
        with pytest.raises(ValueError, match="must be >= low"):
            transport.set_write_buffer_limits(high=100, low=101)
        with pytest.raises(ValueError, match="must be >= low"):
            transport.set_write_buffer_limits(high=10, low=-1)
        assert transport.get_write_buffer_limits() == (50, 100)
        transport.set_write_buffer_limits(high=100, low=100)
        assert transport.get_write_buffer_limits() == (100, 100)
        transport.set_write_buffer_limits(high=100)
        assert transport.get_write_buffer_limits() == (25, 100)
        transport.set_write_buffer_limits(low=10)
        assert transport.get_write_buffer_limits() == (10, 40)
        transport.set_write_buffer_limits()
        assert transport.get_write_buffer_limits() == (16384, 65536)


# ------------------------------------------------------------------------------------ no cycle


async def _lose(path: str, transport: SocketTransport, protocol: RecordingProtocol, peer: socket.socket) -> None:
    """End the connection the way ``path`` names, and wait for ``connection_lost``."""
    if path == "close":
        transport.close()
    elif path == "close_buffered":
        written = fill(transport, payload(4 * 1024 * 1024, seed=8))
        transport.close()
        assert len(await recv_until_eof(peer)) == written
    elif path == "abort":
        transport.abort()
    elif path == "peer_eof":
        peer.shutdown(socket.SHUT_WR)
    else:
        assert path == "peer_reset"
        reset(peer)
    await protocol.wait_for(lambda: protocol.lost)
    await turns(3)  # callbacks the loop had queued for this turn have run


@pytest.mark.parametrize("path", ["close", "close_buffered", "abort", "peer_eof", "peer_reset"])
async def test_no_reference_cycle_once_the_connection_is_lost(path: str) -> None:
    """Once the connection is lost the transport is freed by reference counting alone, though its
    protocol holds it (as the driver does): nothing it keeps refers back to it, neither the protocol
    nor a bound method of its own (the selector's handles, a callback)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        ours, peer = tcp_pair(small=path == "close_buffered")
        try:
            protocol = RecordingProtocol()
            transport = make(ours, protocol, high=1 << 30)
            transport.get_extra_info("peername")
            transport.get_extra_info("socket")
            await _lose(path, transport, protocol, peer)
            assert protocol.names()[-1] == "lost"
            assert (protocol.calls[-1][1] is None) == (path != "peer_reset")
            freed = weakref.ref(transport)
            del transport, protocol
            assert freed() is None, "the transport is kept alive by a reference cycle"
        finally:
            ours.close()
            peer.close()
    finally:
        if was_enabled:
            gc.enable()
