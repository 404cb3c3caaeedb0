"""Fuzzing the frame and handshake paths, sans-I/O: arbitrary bytes and frame sequences, split anywhere.

The modules must only ever return effects (never raise), and must not grow state without bound: the
HTTP module keeps at most ``max_request_size`` bytes, the WebSocket module at most about
``max_message_size``, whatever arrives.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywsserver import Reply
from pywsserver.protocols import (
    CloseSocket,
    ConnectionInfo,
    Deliver,
    HTTPProtocol,
    Stop,
    Switch,
    WebSocketProtocol,
    Write,
)
from pywsserver.protocols._http import BadRequest, parse_request_head
from pywsserver.protocols._routing import compile_pattern

CONNECTION = ConnectionInfo(peer=("127.0.0.1", 5000), local=("127.0.0.1", 8080), connection_id=1)
LIMIT = 4096
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given cut points."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]


def http_module() -> HTTPProtocol:
    from pywsserver._options import parse_options

    options = parse_options(
        [("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])])]
    )
    config = options.worker.modules["http"]
    module = HTTPProtocol(config.options, CONNECTION)
    module.start(b"", {})
    return module


@SETTINGS
@given(st.binary(max_size=3000), st.lists(st.integers(0, 4000), max_size=10))
def test_the_http_module_takes_any_bytes_split_anywhere(data: bytes, cuts: list[int]) -> None:
    module = http_module()
    effects: list[Any] = []
    for piece in chunks(data, cuts):
        effects += module.data_received(piece)
        assert len(module._buffer) <= module.options.max_request_size + len(piece)
    assert all(
        isinstance(e, Write | CloseSocket | Stop | Switch | Deliver) or type(e).__name__ == "SetTimer" for e in effects
    )


@SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 2000), max_size=6))
def test_a_valid_request_with_any_trailing_bytes_is_answered_once(tail: bytes, cuts: list[int]) -> None:
    module = http_module()
    switches: list[Switch] = []
    after = b""  # what the worker would give the next module
    for piece in chunks(UPGRADE + b"\r\n" + tail, cuts):
        if switches:
            after += piece
            continue
        switches += [e for e in module.data_received(piece) if isinstance(e, Switch)]
    assert len(switches) == 1
    assert switches[0].data + after == tail  # the bytes after the head are handed over, none lost


@SETTINGS
@given(st.binary(max_size=2000))
def test_parse_request_head_raises_only_bad_request(head: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse_request_head(head)


@given(st.text(max_size=40))
def test_resource_patterns_compile_or_are_refused_with_value_error(pattern: str) -> None:
    with contextlib.suppress(ValueError):
        compile_pattern("/" + pattern)


def websocket_module() -> WebSocketProtocol:
    raw = [("handler_module", "pywsserver.echo"), ("max_message_size", LIMIT), ("ping_interval", None)]
    module = WebSocketProtocol(WebSocketProtocol.parse_options(raw, "websocket"), CONNECTION)
    module.start(b"", {})
    module.handler_returned(None)
    return module


def drive(module: WebSocketProtocol, pieces: list[bytes]) -> list[Any]:
    """Feed the pieces, answering every delivery as an echo handler would; check bounds as we go."""
    delivered: list[Any] = []
    for piece in pieces:
        pending = module.data_received(piece)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Deliver):
                delivered.append(effect.message)
                message = effect.message
                result = Reply(message, None) if isinstance(message, str | bytes) else None
                pending += module.handler_returned(result)
        assert len(module._carry) <= LIMIT + 14
        assert module._size <= LIMIT
        assert len(module._inbox) <= len(piece) + 2  # at most a message per two bytes received, plus the close
    return delivered


@SETTINGS
@given(st.binary(max_size=6000), st.lists(st.integers(0, 7000), max_size=10))
def test_the_websocket_module_takes_any_bytes_split_anywhere(data: bytes, cuts: list[int]) -> None:
    drive(websocket_module(), chunks(data, cuts))


FRAME = st.tuples(
    st.booleans(),  # fin
    st.integers(0, 7),  # rsv
    st.sampled_from([0, 1, 2, 8, 9, 10, 3, 11]),  # opcodes, reserved ones included
    st.binary(max_size=300),
    st.booleans(),  # masked
)


def encode(fin: bool, rsv: int, opcode: int, payload: bytes, masked: bool) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if masked else 0
    size = len(payload)
    header = bytes((first, bit | size)) if size < 126 else bytes((first, bit | 126)) + struct.pack("!H", size)
    return header + (b"\x01\x02\x03\x04" + bytes(b ^ (i % 4 + 1) for i, b in enumerate(payload)) if masked else payload)


@SETTINGS
@given(st.lists(FRAME, max_size=20), st.lists(st.integers(0, 8000), max_size=8))
def test_the_websocket_module_takes_any_frame_sequence(frames: list[Any], cuts: list[int]) -> None:
    data = b"".join(encode(*frame) for frame in frames)
    delivered = drive(websocket_module(), chunks(data, cuts))
    # Whatever happened, the connection-close notice comes at most once, and last.
    closes = [m for m in delivered if type(m).__name__ == "ConnectionClose"]
    assert len(closes) <= 1
    if closes:
        assert delivered[-1] is closes[0]


@SETTINGS
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=30), st.lists(st.integers(0, 9000), max_size=8))
def test_valid_fragmented_messages_arrive_whole_however_split(parts: list[bytes], cuts: list[int]) -> None:
    frames = []
    for index, part in enumerate(parts):
        opcode = 2 if index == 0 else 0
        frames.append(encode(index == len(parts) - 1, 0, opcode, part, True))
        if index % 3 == 1:
            frames.append(encode(True, 0, 9, b"ping", True))  # control frames may interleave
    delivered = drive(websocket_module(), chunks(b"".join(frames), cuts))
    message = b"".join(parts)
    if len(message) <= LIMIT:
        assert [m for m in delivered if isinstance(m, bytes)] == [message]
    else:
        assert type(delivered[-1]).__name__ == "ConnectionClose"
        assert delivered[-1].code == 1009
