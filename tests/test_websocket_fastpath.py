"""The WebSocket module's own frame path agrees with wsproto's on any client input (hypothesis)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from pywsserver import NoReply
from pywsserver.protocols import ConnectionInfo, Deliver, WebSocketProtocol, Write

CONNECTION = ConnectionInfo(peer=None, local=None, connection_id=0)


def client_frames() -> st.SearchStrategy[list[Any]]:
    text = st.text(max_size=300)
    data = st.binary(max_size=300)
    frame = st.one_of(
        st.builds(lambda t: TextMessage(data=t), text),
        st.builds(lambda b: BytesMessage(data=b), data),
        st.builds(lambda t: ("fragments", t), st.lists(text, min_size=2, max_size=4)),
        st.builds(lambda b: Ping(payload=b), st.binary(max_size=125)),
        st.builds(lambda b: Pong(payload=b), st.binary(max_size=125)),
        st.just(("raw", b"\x81\x05hello")),  # unmasked: a protocol error
        st.just(("raw", b"\xc1\x80\x00\x00\x00\x00")),  # a reserved bit: a protocol error
        st.just(("raw", b"\x81\x82\x00\x00\x00\x00\xff\xfe")),  # invalid UTF-8
        st.builds(lambda c: CloseConnection(code=c), st.sampled_from([1000, 1001, 4000])),
        st.builds(lambda payload: ("raw", masked_close(payload)), close_payloads()),
    )
    return st.lists(frame, max_size=12)


def close_payloads() -> st.SearchStrategy[bytes]:
    """Close frame payloads a peer may send and ones it must not: every branch of the fast path's check."""
    codes = st.one_of(
        st.sampled_from([999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1013, 1014, 1015]),
        st.sampled_from([2999, 3000, 3999, 4000, 4999, 5000, 65535]),
        st.integers(0, 65535),
    )
    reasons = st.one_of(st.text(max_size=40).map(lambda t: t.encode("utf-8")[:123]), st.binary(max_size=123))
    with_code = st.builds(lambda code, reason: code.to_bytes(2, "big") + reason, codes, reasons)
    return st.one_of(st.just(b""), st.binary(min_size=1, max_size=1), with_code)


def masked_close(payload: bytes, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    """A client's close frame with any payload, valid or not (wsproto's client would refuse to make some)."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + masked


def encode(frames: list[Any]) -> bytes:
    client = Connection(ConnectionType.CLIENT)
    out = b""
    for frame in frames:
        try:
            if isinstance(frame, tuple) and frame[0] == "raw":
                out += frame[1]
            elif isinstance(frame, tuple):
                parts = frame[1]
                for i, part in enumerate(parts):
                    out += client.send(TextMessage(data=part, message_finished=i == len(parts) - 1))
            else:
                out += client.send(frame)
        except Exception:  # the client refuses to send after its own close
            break
    return out


def run(data: bytes, cuts: list[int], fast: bool, limit: int) -> tuple[list[Any], bytes]:
    """Feed ``data`` in pieces; answer every delivery with NoReply; return deliveries and bytes written."""
    options = WebSocketProtocol.parse_options(
        [("handler_module", "pywsserver.echo"), ("max_message_size", limit), ("control_messages", True)], "websocket"
    )
    module = WebSocketProtocol(options, CONNECTION)
    module._fast = fast
    delivered: list[Any] = []
    written = b""

    def settle(effects: list[Any]) -> None:
        nonlocal written
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Write):
                written += effect.data
            elif isinstance(effect, Deliver):
                delivered.append(effect.message)
                pending = module.handler_returned(None if len(delivered) == 1 else NoReply(None)) + pending

    settle(module.start(b"", {}))
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > start:
            settle(module.data_received(data[start:cut]))
            start = cut
    return [type(m).__name__ if m.__class__.__name__ == "Opened" else m for m in delivered], written


@settings(max_examples=int(os.environ.get("PYWSSERVER_FUZZ_EXAMPLES", "300")), deadline=None)
@given(frames=client_frames(), cuts=st.lists(st.integers(0, 4000), max_size=8), limit=st.sampled_from([64, 1 << 20]))
def test_the_fast_path_and_wsproto_deliver_the_same(frames: list[Any], cuts: list[int], limit: int) -> None:
    data = encode(frames)
    assert run(data, cuts, fast=True, limit=limit) == run(data, cuts, fast=False, limit=limit)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x03",
        *(code.to_bytes(2, "big") for code in [0, 999, *range(1000, 1017), 2999, 3000, 3999, 4000, 4999, 5000]),
        (1000).to_bytes(2, "big") + "bye, ça va".encode(),
        (4000).to_bytes(2, "big") + b"\xff\xfe",  # a reason that is not UTF-8: 1007
        (1001).to_bytes(2, "big") + b"r" * 123,  # the longest reason a close frame holds
    ],
)
def test_every_close_frame_gets_the_same_answer_on_both_paths(payload: bytes) -> None:
    data = encode([TextMessage(data="before")]) + masked_close(payload) + encode([TextMessage(data="after")])
    fast = run(data, [], fast=True, limit=1 << 20)
    assert fast == run(data, [], fast=False, limit=1 << 20)
    assert fast[0][1] == "before" and "after" not in fast[0]
