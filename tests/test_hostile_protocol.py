"""Hostile and unusual clients against the protocol modules, over real sockets, on both backends.

Each test pins one hole that was found from outside (fragments without end, compressed frames refused
below the limit, a ping inside a compressed message, lenient HTTP, small protocol points) and fails
without its fix. Frames are built by hand (``tests/test_conformance.py``'s helpers) or sent by the
``websockets`` client.
"""

from __future__ import annotations

import os
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from pywsserver import start_link

from .recorder import server_options
from .test_conformance import BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Peer, close_payload, connect, frame
from .wstools import in_client_thread, url

pytestmark = pytest.mark.anyio

DEFLATE = "Sec-WebSocket-Extensions: permessage-deflate\r\n"


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with start_link(server_options(websocket=[("ping_interval", None)])) as server:
        yield server.port


def compress(data: bytes, compressor: Any) -> bytes:
    """A message's compressed payload (RFC 7692 7.2.1: the trailing 00 00 ff ff removed)."""
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(payload: bytes, decompressor: Any) -> bytes:
    return bytes(decompressor.decompress(payload + b"\x00\x00\xff\xff"))


async def next_data_frame(peer: Peer) -> tuple[bool, int, int, bytes, int]:
    """The next frame that is not a pong."""
    for _ in range(10):
        received = await peer.frame()
        assert received is not None, "the server closed the connection"
        if received[2] != PONG:
            return received
    raise AssertionError("only pongs")


# ------------------------------------------------------------- 1. endless fragments


async def test_endless_empty_continuation_frames_are_refused_with_1009(port: int) -> None:
    peer = await connect(port)
    # One byte, then empty continuation frames that never end the message: the count of bytes stays at
    # 1, so only a bound on frames per message (4096 by default, as websockets) stops it.
    await peer.send(frame(BINARY, b"x", fin=False) + frame(CONTINUATION, b"", fin=False) * 5000)
    reason = await peer.expect_close(1009)
    assert b"4096 frames" in reason


async def test_a_message_in_as_many_frames_as_allowed_is_delivered(port: int) -> None:
    peer = await connect(port)
    data = os.urandom(4096)
    frames = [frame(BINARY if i == 0 else CONTINUATION, data[i : i + 1], fin=i == 4095) for i in range(4096)]
    await peer.send(b"".join(frames))
    assert await peer.frame() == (True, 0, BINARY, data, 2)
    await peer.stream.aclose()


async def test_max_fragments_bounds_frames_per_message_and_text_fragments_too() -> None:
    async with start_link(server_options(websocket=[("ping_interval", None), ("max_fragments", 3)])) as server:
        peer = await connect(server.port)
        await peer.send(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, b"b", fin=False) + frame(CONTINUATION, b"c"))
        assert await peer.frame() == (True, 0, TEXT, b"abc", 0)
        await peer.send(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, b"", fin=False) * 3)
        assert b"3 frames" in await peer.expect_close(1009)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # on trio the client's own sends allocate a lot in-process
async def test_a_message_in_one_byte_fragments_costs_memory_near_its_size(anyio_backend: str) -> None:
    size = 16384
    # No watchdog: under tracemalloc the loop is slow enough for its report, whose allocations are not the message's.
    options = server_options(websocket=[("ping_interval", None), ("max_fragments", size)], loop_watchdog=None)
    data = os.urandom(size)
    attack = b"".join(
        frame(BINARY if i == 0 else CONTINUATION, data[i : i + 1], fin=i == size - 1) for i in range(size)
    )
    async with start_link(options) as server:
        peer = await connect(server.port)
        await peer.send(frame(BINARY, b"warm up"))  # the server's buffers exist before measuring
        assert (await peer.frame() or (None,) * 4)[3] == b"warm up"
        tracemalloc.start()
        try:
            await peer.send(attack)
            with anyio.fail_after(60):
                assert await peer.fill(4 + size)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await peer.frame() == (True, 0, BINARY, data, 2)
        # A list of one-byte parts held about 120 bytes per fragment (2 MiB here); one growing buffer
        # holds the message, its copy for the handler, the reply and a read's buffers (about 260 KiB).
        assert peak < 1024 * 1024, peak
        await peer.stream.aclose()


# ----------------------------------------------- 5. compressed frames bounded after inflation


async def test_a_compressed_message_whose_frame_exceeds_the_limit_on_the_wire_but_not_inflated() -> None:
    data = os.urandom(1_048_000)  # random: deflate makes it slightly larger, above 1 MiB on the wire

    async with start_link(server_options(websocket=[("ping_interval", None)])) as server:

        async def client(address: str) -> bytes:
            from websockets.asyncio.client import connect as ws_connect

            async with ws_connect(address, max_size=2**21, ping_interval=None) as ws:
                assert ws.response is not None
                assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
                await ws.send(data)
                reply = await ws.recv()
                assert isinstance(reply, bytes)
                return reply

        assert await in_client_thread(client, url(server)) == data


async def test_a_compressed_message_inflating_above_the_limit_is_still_refused() -> None:
    async with start_link(server_options(websocket=[("ping_interval", None), ("max_message_size", 1000)])) as server:
        peer = await connect(server.port, DEFLATE)
        await peer.send(frame(BINARY, compress(b"\x00" * 1001, zlib.compressobj(9, zlib.DEFLATED, -15)), rsv=4))
        await peer.expect_close(1009)


async def test_compressed_frames_that_inflate_to_nothing_are_bounded_on_the_wire_too() -> None:
    async with start_link(server_options(websocket=[("ping_interval", None), ("max_message_size", 1000)])) as server:
        peer = await connect(server.port, DEFLATE)
        empty = compress(b"", zlib.compressobj(9, zlib.DEFLATED, -15))
        # Empty stored blocks inflate to nothing: 2 * 1000 + 65536 bytes of them are refused.
        padding = b"\x00\x00\x00\xff\xff" * 14000
        await peer.send(frame(BINARY, padding + empty, rsv=4))
        await peer.expect_close(1009)


# --------------------------------------------- 6. a ping between compressed fragments


@pytest.mark.parametrize("opcode", [BINARY, TEXT])
async def test_a_ping_between_compressed_fragments_leaves_the_message_intact(port: int, opcode: int) -> None:
    peer = await connect(port, DEFLATE)
    compressor, decompressor = zlib.compressobj(9, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    for number in range(2):  # the next message must be intact too (the inflation state goes on)
        data = f"message {number}: ".encode() + b"".join(b"%d " % i for i in range(2000))
        compressed = compress(data, compressor)
        third = len(compressed) // 3
        await peer.send(
            frame(opcode, compressed[:third], fin=False, rsv=4)
            + frame(PING, b"between")
            + frame(CONTINUATION, compressed[third : 2 * third], fin=False)
            + frame(PING, b"again")
            + frame(CONTINUATION, compressed[2 * third :])
        )
        assert (await peer.frame() or (None,) * 4)[2:4] == (PONG, b"between")
        assert (await peer.frame() or (None,) * 4)[2:4] == (PONG, b"again")
        fin, rsv, received_opcode, payload, _ = await next_data_frame(peer)
        assert (fin, rsv, received_opcode) == (True, 4, opcode)
        assert inflate(payload, decompressor) == data
    await peer.stream.aclose()


# ------------------------------------------------------- 9. small protocol points


async def test_close_code_1014_is_accepted_and_echoed(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, close_payload(1014, b"bad gateway")))
    assert await peer.expect_close(1014) == b"bad gateway"


async def test_close_code_1014_is_accepted_after_a_fragmented_message_too(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, b"frag", fin=False) + frame(CONTINUATION, b"ments"))
    assert await peer.frame() == (True, 0, TEXT, b"fragments", 0)
    await peer.send(frame(CLOSE, close_payload(1014, b"bad gateway")))
    assert await peer.expect_close(1014) == b"bad gateway"


async def test_an_offer_of_client_max_window_bits_8_is_answered_with_at_most_8(port: int) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    from .test_conformance import request

    await peer.send(request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=8\r\n"))
    head = (await peer.head()).decode().lower()
    assert head.startswith("http/1.1 101 ")
    extension = next(line for line in head.split("\r\n") if line.startswith("sec-websocket-extensions:"))
    assert "client_max_window_bits=8" in extension.replace(" ", "")
    # zlib writes 9-bit windows when asked for 8; the server reads them.
    compressor, decompressor = zlib.compressobj(9, zlib.DEFLATED, -9), zlib.decompressobj(-15)
    for number in range(3):
        data = bytes(range(256)) * 8 + b"%d" % number
        await peer.send(frame(BINARY, compress(data, compressor), rsv=4))
        received = await peer.frame()
        assert received is not None and inflate(received[3], decompressor) == data
    await peer.stream.aclose()


async def test_invalid_utf8_in_one_text_frame_fails_before_the_frame_has_arrived(port: int) -> None:
    peer = await connect(port)
    # A 64 KiB text frame whose first bytes are not UTF-8; the rest is never sent.
    whole = frame(TEXT, b"\xff" + b"a" * 65535)
    await peer.send(whole[:200])
    await peer.expect_close(1007)


async def test_invalid_utf8_split_inside_one_frame_is_found_as_it_arrives(port: int) -> None:
    peer = await connect(port)
    snowman = "☃".encode()
    # Valid so far across three sends (a character split between them), then a byte that is invalid.
    whole = frame(TEXT, b"a" * 100 + snowman + b"b" * 100 + b"\xc3\x28" + b"c" * 65000)
    await peer.send(whole[:110])
    await peer.send(whole[110:115])
    await peer.send(whole[115:300])
    await peer.expect_close(1007)


async def test_valid_text_arriving_in_pieces_is_delivered_whole(port: int) -> None:
    peer = await connect(port)
    text = ("é☃𝄞" * 3000).encode()
    whole = frame(TEXT, text)
    for cut in range(0, len(whole), 997):  # cuts fall inside characters
        await peer.send(whole[cut : cut + 997])
    assert await peer.frame() == (True, 0, TEXT, text, 2)
    await peer.stream.aclose()


# ------------------------------------------------------------------ 8. strict HTTP


async def answer(port: int, head: bytes) -> bytes:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(head)
    status = (await peer.head()).split(b"\r\n")[0]
    await peer.stream.aclose()
    return status


def upgrade(path: str = "/", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (
        f"GET {path} {version}\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode("latin-1")


@pytest.mark.parametrize(
    ("case", "request_head", "status"),
    [
        ("a CR inside a header value", upgrade(extra="X-Note: a\rb\r\n"), b"400"),
        ("a bare LF inside a header value", upgrade(extra="X-Note: a\nInjected: yes\r\n"), b"400"),
        ("a NUL inside a header value", upgrade(extra="X-Note: a\x00b\r\n"), b"400"),
        ("another control character", upgrade(extra="X-Note: a\x1bb\r\n"), b"400"),
        ("HTTP/9.9", upgrade(version="HTTP/9.9"), b"505"),
        ("HTTP/2.0", upgrade(version="HTTP/2.0"), b"505"),
        ("HTTP/1.2", upgrade(version="HTTP/1.2"), b"400"),
        ("HTTP/1.0", upgrade(version="HTTP/1.0"), b"400"),
        ("a body announced by Content-Length", upgrade(extra="Content-Length: 6\r\n"), b"400"),
        ("a body announced by Transfer-Encoding", upgrade(extra="Transfer-Encoding: chunked\r\n"), b"400"),
        ("a CR LF in the decoded path", upgrade(path="/chat%0d%0aInjected:%20yes"), b"400"),
        ("a NUL in the decoded path", upgrade(path="/chat%00"), b"400"),
        ("a decoded path that is not UTF-8", upgrade(path="/chat%ff"), b"400"),
        ("an escaped letter in the path", upgrade(path="/%61dmin"), b"400"),
        ("an escaped slash in the path", upgrade(path="/chat%2Fadmin"), b"400"),
        ("a raw non-ASCII byte in the target", upgrade(path="/caf\xe9"), b"400"),
    ],
)
async def test_lenient_http_is_refused(port: int, case: str, request_head: bytes, status: bytes) -> None:
    assert (await answer(port, request_head)).split(b" ")[1] == status, case


async def test_what_needs_escaping_is_decoded_for_the_handler_and_routing_and_a_zero_length_passes() -> None:
    from .recorder import Recorder

    recorder = Recorder()
    options = server_options(recorder, websocket=[("ping_interval", None), ("resources", [("/café/{room}", {})])])
    async with start_link(options) as server:
        assert await answer(server.port, upgrade(path="/caf%C3%A9/a%20b", extra="Content-Length: 0\r\n")) == (
            b"HTTP/1.1 101 Switching Protocols"
        )
        await recorder.wait_for(lambda: len(recorder.inits) == 1)
        info = recorder.inits[0]
        assert (info["path"], info["params"]) == ("/café/a b", {"room": "a b"})
        assert await answer(server.port, upgrade(path="/%63af%C3%A9/x")) == b"HTTP/1.1 400 Bad Request"
