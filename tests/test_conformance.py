"""Conformance with RFC 6455 and RFC 7692, byte by byte over a socket to the running server.

Written from the RFCs, not from any implementation: the client here builds
frames by hand and parses the server's frames itself. Each case names the
section it checks. The server runs the echo handler with its defaults
(compression on, so RFC 7692 is exercised when a client offers it).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest

from pywsserver import start_link

from .recorder import server_options

pytestmark = pytest.mark.anyio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def request(extra: str = "", *, key: str | None = KEY, version: str | None = "13", path: str = "/") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """A client frame (RFC 6455 section 5.2), masked unless told otherwise."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        header = bytes((first, bit | size))
    elif size < 65536:
        header = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


class Peer:
    """A raw connection: sends bytes, parses the server's frames by the RFC."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            try:
                self.buffer += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return False
        return True

    async def head(self) -> bytes:
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in self.buffer:
                self.buffer += await self.stream.receive()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    async def frame(self) -> tuple[bool, int, int, bytes, int] | None:
        """``(fin, rsv, opcode, payload, length_bytes)`` of the next server frame; ``None`` at EOF."""
        with anyio.fail_after(5):
            if not await self.fill(2):
                return None
            first, second = self.buffer[0], self.buffer[1]
            assert not second & 0x80, "RFC 6455 5.1: a server must not mask its frames"
            size, offset = second & 0x7F, 2
            if size == 126:
                assert await self.fill(4)
                size, offset = int.from_bytes(self.buffer[2:4], "big"), 4
            elif size == 127:
                assert await self.fill(10)
                size, offset = int.from_bytes(self.buffer[2:10], "big"), 10
            assert await self.fill(offset + size)
            payload = self.buffer[offset : offset + size]
            self.buffer = self.buffer[offset + size :]
            return bool(first & 0x80), (first >> 4) & 7, first & 0x0F, payload, offset - 2

    async def expect_close(self, code: int | None) -> bytes:
        """The next frame is a close with ``code`` (``None``: no payload); then the server closes TCP."""
        received = await self.frame()
        assert received is not None, "the server closed TCP without a close frame"
        _, _, opcode, payload, _ = received
        assert opcode == CLOSE, f"expected a close frame, got opcode {opcode} {payload[:40]!r}"
        if code is None:
            assert payload in (b"", b"\x03\xe8")
        else:
            assert int.from_bytes(payload[:2], "big") == code, payload
        assert await self.eof(), "RFC 6455 7.1.1: the server closes the TCP connection after the closing handshake"
        return payload[2:]

    async def eof(self) -> bool:
        with anyio.fail_after(5):
            return not await self.fill(len(self.buffer) + 1)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with start_link(server_options(websocket=[("ping_interval", None)])) as server:
        yield server.port


async def connect(port: int, extra: str = "") -> Peer:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(request(extra))
    head = await peer.head()
    assert head.startswith(b"HTTP/1.1 101 "), head
    return peer


async def echoed(peer: Peer, opcode: int, payload: bytes) -> tuple[bool, int, int, bytes, int] | None:
    await peer.send(frame(opcode, payload))
    return await peer.frame()


# ------------------------------------------------------------- opening handshake


def accept_value(key: str) -> bytes:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())


async def test_4_2_2_the_accept_value_is_the_hash_of_the_key_and_guid(port: int) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(request())
    head = (await peer.head()).decode().lower()
    assert "upgrade: websocket" in head
    assert "connection: upgrade" in head
    assert f"sec-websocket-accept: {accept_value(KEY).decode().lower()}" in head
    await peer.stream.aclose()


@pytest.mark.parametrize(
    ("section", "data", "status", "header"),
    [
        ("4.2.1 item 6: version other than 13", request(version="8"), b"426", b"sec-websocket-version: 13"),
        ("4.2.1 item 6: version missing", request(version=None), b"426", b"sec-websocket-version: 13"),
        ("4.2.1 item 5: key missing", request(key=None), b"400", b""),
        ("4.2.1 item 5: key not 16 bytes", request(key=base64.b64encode(b"short").decode()), b"400", b""),
        ("4.2.1 item 5: key not base64", request(key="not base64 at all!!"), b"400", b""),
        ("4.2.1 item 5: two keys", request(f"Sec-WebSocket-Key: {KEY}\r\n"), b"400", b""),
        (
            "4.2.1 item 3: no Upgrade token",
            request().replace(b"Upgrade: websocket\r\n", b""),
            b"426",
            b"upgrade: websocket",
        ),
        (
            "4.2.1 item 4: no Connection token",
            request().replace(b"Connection: Upgrade", b"Connection: close"),
            b"400",
            b"",
        ),
        ("4.2.1 item 2: no Host", request().replace(b"Host: localhost\r\n", b""), b"400", b""),
        ("4.2.1 item 1: not GET", request().replace(b"GET ", b"PUT ", 1), b"405", b"allow: get"),
        ("4.2.1 item 1: HTTP/1.0", request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), b"400", b""),
    ],
)
async def test_invalid_opening_handshakes_get_an_http_error(
    port: int, section: str, data: bytes, status: bytes, header: bytes
) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(data)
    head = await peer.head()
    assert head.split(b" ")[1] == status, section
    assert header in head.lower(), section
    assert await peer.eof()


@pytest.mark.parametrize(
    ("section", "data"),
    [
        (
            "4.2.1: header names and tokens are case-insensitive",
            request().replace(b"Upgrade: websocket", b"UPGRADE: WebSocket"),
        ),
        (
            "4.2.1 item 4: Connection is a token list",
            request().replace(b"Connection: Upgrade", b"Connection: keep-alive, UPGRADE"),
        ),
        (
            "4.2.1 item 3: Upgrade is a token list",
            request().replace(b"Upgrade: websocket", b"Upgrade: foo/1, websocket"),
        ),
        ("4.1: other headers are ignored", request("X-Anything: 1\r\nCookie: a=b\r\n")),
    ],
)
async def test_valid_handshake_variants_are_accepted(port: int, section: str, data: bytes) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(data)
    assert (await peer.head()).startswith(b"HTTP/1.1 101 "), section
    assert await echoed(peer, TEXT, b"ok") == (True, 0, TEXT, b"ok", 0)
    await peer.stream.aclose()


async def test_4_2_1_a_handshake_split_over_many_segments(port: int) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    for byte in request():  # one TCP segment per byte (TCP_NODELAY is on by default in anyio)
        await peer.send(bytes((byte,)))
    assert (await peer.head()).startswith(b"HTTP/1.1 101 ")
    assert await echoed(peer, TEXT, b"split") == (True, 0, TEXT, b"split", 0)
    await peer.stream.aclose()


async def test_4_2_frames_in_the_same_segment_as_the_handshake_are_not_lost(port: int) -> None:
    peer = Peer(await anyio.connect_tcp("127.0.0.1", port))
    await peer.send(request() + frame(TEXT, b"first") + frame(BINARY, b"second"))
    assert (await peer.head()).startswith(b"HTTP/1.1 101 ")
    assert await peer.frame() == (True, 0, TEXT, b"first", 0)
    assert await peer.frame() == (True, 0, BINARY, b"second", 0)
    await peer.stream.aclose()


# ---------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("size", "length_bytes"),
    [(0, 0), (125, 0), (126, 2), (65535, 2), (65536, 8), (100_000, 8)],
)
async def test_5_2_payload_lengths_7_16_and_64_bit_with_minimal_encoding(
    port: int, size: int, length_bytes: int
) -> None:
    peer = await connect(port)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert await echoed(peer, BINARY, payload) == (True, 0, BINARY, payload, length_bytes)
    await peer.stream.aclose()


async def test_5_1_an_unmasked_client_frame_is_a_protocol_error(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, b"naked", mask=False))
    await peer.expect_close(1002)


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
async def test_5_2_reserved_bits_without_an_extension_are_a_protocol_error(port: int, rsv: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, b"x", rsv=rsv))
    await peer.expect_close(1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
async def test_5_2_reserved_opcodes_are_a_protocol_error(port: int, opcode: int) -> None:
    peer = await connect(port)
    await peer.send(frame(opcode, b"x"))
    await peer.expect_close(1002)


async def test_5_4_fragments_with_control_frames_interleaved(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, b"frag", fin=False))
    await peer.send(frame(PING, b"in the middle"))
    assert await peer.frame() == (True, 0, PONG, b"in the middle", 0)  # 5.5.3: answered at once
    await peer.send(frame(CONTINUATION, b"men", fin=False) + frame(PONG, b"unsolicited"))
    await peer.send(frame(CONTINUATION, b"ted"))
    assert await peer.frame() == (True, 0, TEXT, b"fragmented", 0)
    await peer.stream.aclose()


@pytest.mark.parametrize(
    ("section", "frames"),
    [
        ("5.4: a continuation with nothing to continue", [frame(CONTINUATION, b"x")]),
        ("5.4: a new message inside a fragmented one", [frame(TEXT, b"a", fin=False), frame(TEXT, b"b")]),
        ("5.4: a binary frame inside a fragmented text", [frame(TEXT, b"a", fin=False), frame(BINARY, b"b")]),
        ("5.5: a fragmented control frame", [frame(PING, b"x", fin=False)]),
        ("5.5: a control frame over 125 bytes", [frame(PING, b"x" * 126)]),
        ("5.5: a close frame over 125 bytes", [frame(CLOSE, close_payload(1000, b"x" * 124))]),
    ],
)
async def test_fragmentation_and_control_frame_rules(port: int, section: str, frames: list[bytes]) -> None:
    peer = await connect(port)
    await peer.send(b"".join(frames))
    await peer.expect_close(1002)


async def test_5_5_2_a_ping_of_125_bytes_gets_a_pong_with_the_same_payload(port: int) -> None:
    peer = await connect(port)
    assert await echoed(peer, PING, b"p" * 125) == (True, 0, PONG, b"p" * 125, 0)
    await peer.stream.aclose()


# ------------------------------------------------------------------------ UTF-8


@pytest.mark.parametrize(
    ("section", "frames"),
    [
        ("8.1: invalid UTF-8 in a text message", [frame(TEXT, b"caf\xc3")]),
        ("8.1: a surrogate encoded in UTF-8", [frame(TEXT, b"\xed\xa0\x80")]),
        ("8.1: invalid UTF-8 across fragments", [frame(TEXT, b"ok \xf0\x9f", fin=False), frame(CONTINUATION, b"\x28")]),
    ],
)
async def test_invalid_utf8_in_text_closes_with_1007(port: int, section: str, frames: list[bytes]) -> None:
    peer = await connect(port)
    await peer.send(b"".join(frames))
    await peer.expect_close(1007)


async def test_8_1_invalid_utf8_is_detected_before_the_message_ends(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, b"\xff never valid", fin=False))  # no final fragment is ever sent
    await peer.expect_close(1007)


async def test_8_1_a_character_split_across_fragments_is_valid(port: int) -> None:
    peer = await connect(port)
    snowman = "☃".encode()
    await peer.send(frame(TEXT, b"a" + snowman[:1], fin=False) + frame(CONTINUATION, snowman[1:2], fin=False))
    await peer.send(frame(CONTINUATION, snowman[2:] + b"b"))
    assert await peer.frame() == (True, 0, TEXT, "a☃b".encode(), 0)
    await peer.stream.aclose()


# ----------------------------------------------------------------- closing


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1008, 1011, 3000, 4999])
async def test_7_4_valid_close_codes_are_echoed(port: int, code: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, close_payload(code, b"bye")))
    await peer.expect_close(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
async def test_7_4_invalid_close_codes_on_the_wire_are_a_protocol_error(port: int, code: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, close_payload(code)))
    await peer.expect_close(1002)


async def test_5_5_1_a_close_payload_of_one_byte_is_a_protocol_error(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, b"\x03"))
    await peer.expect_close(1002)


async def test_5_5_1_a_close_reason_in_invalid_utf8_closes_with_1007(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, close_payload(1000, b"\xff\xfe")))
    await peer.expect_close(1007)


async def test_5_5_1_an_empty_close_is_answered(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE))
    await peer.expect_close(None)


async def test_5_5_1_nothing_is_sent_after_the_close_and_data_after_it_is_ignored(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(CLOSE, close_payload(1000)) + frame(TEXT, b"too late"))
    await peer.expect_close(1000)


async def test_7_1_2_the_server_starts_the_closing_handshake_and_closes_tcp_after_the_answer() -> None:
    from .recorder import Recorder

    recorder = Recorder()
    async with start_link(server_options(recorder, websocket=[("ping_interval", None)])) as server:
        peer = await connect(server.port)
        await peer.send(frame(TEXT, b"close:4001:done"))
        received = await peer.frame()
        assert received == (True, 0, CLOSE, close_payload(4001, b"done"), 0)
        await peer.send(frame(CLOSE, close_payload(4001)))
        assert await peer.eof()
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 4001


# --------------------------------------------------------- RFC 7692 (deflate)


def deflate(data: bytes, compressor: Any) -> bytes:
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]  # 7.2.1: the trailing four octets are removed


async def test_7692_a_compressed_message_is_inflated_and_the_reply_compressed(port: int) -> None:
    peer = await connect(port, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    text = b"hello hello hello hello"
    await peer.send(frame(TEXT, deflate(text, compressor), rsv=4))  # RSV1 marks a compressed message
    received = await peer.frame()
    assert received is not None
    fin, rsv, opcode, payload, _ = received
    assert (fin, rsv, opcode) == (True, 4, TEXT)
    assert zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff") == text
    # 7.2.3.1: context takeover: a second message may refer to the first.
    await peer.send(frame(TEXT, deflate(text, compressor), rsv=4))
    assert (await peer.frame() or (None,))[0] is True
    await peer.stream.aclose()


async def test_7692_a_compressed_message_in_fragments(port: int) -> None:
    peer = await connect(port, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    compressed = deflate(b"fragmented and compressed", zlib.compressobj(9, zlib.DEFLATED, -15))
    middle = len(compressed) // 2
    await peer.send(frame(BINARY, compressed[:middle], fin=False, rsv=4) + frame(CONTINUATION, compressed[middle:]))
    received = await peer.frame()
    assert received is not None
    assert zlib.decompressobj(-15).decompress(received[3] + b"\x00\x00\xff\xff") == b"fragmented and compressed"
    await peer.stream.aclose()


@pytest.mark.parametrize(
    ("section", "frames"),
    [
        ("6.1: RSV1 on a control frame", [frame(PING, b"x", rsv=4)]),
        ("6.1: RSV1 on a continuation frame", [frame(BINARY, b"", fin=False), frame(CONTINUATION, b"x", rsv=4)]),
    ],
)
async def test_7692_rsv1_only_on_the_first_frame_of_a_data_message(
    port: int, section: str, frames: list[bytes]
) -> None:
    peer = await connect(port, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    await peer.send(b"".join(frames))
    await peer.expect_close(1002)


async def test_7692_rsv1_without_negotiation_is_a_protocol_error(port: int) -> None:
    peer = await connect(port)
    await peer.send(frame(TEXT, deflate(b"x", zlib.compressobj(9, zlib.DEFLATED, -15)), rsv=4))
    await peer.expect_close(1002)


async def test_7692_compressed_data_that_is_not_deflate_closes_with_1007(port: int) -> None:
    peer = await connect(port, "Sec-WebSocket-Extensions: permessage-deflate\r\n")
    await peer.send(frame(BINARY, b"\xff\xff\xff\xff\xff", rsv=4))
    await peer.expect_close(1007)
