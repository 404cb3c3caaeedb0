"""permessage-deflate, sans-I/O: negotiation (RFC 7692 section 7) and inflation bounded by the size limit."""

from __future__ import annotations

import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.extensions import PerMessageDeflate

from pywsserver import Reply
from pywsserver.protocols import ConnectionInfo, Deliver, WebSocketProtocol, Write
from pywsserver.protocols._deflate import DeflateOptions, negotiate, parse_extensions

CONNECTION = ConnectionInfo(peer=("127.0.0.1", 5000), local=("127.0.0.1", 8080), connection_id=1)


@pytest.mark.parametrize(
    ("offer", "response"),
    [
        ("permessage-deflate", "permessage-deflate"),
        ("permessage-deflate; client_max_window_bits", "permessage-deflate; client_max_window_bits=12"),
        ("permessage-deflate; server_max_window_bits=10", "permessage-deflate; server_max_window_bits=10"),
        ("permessage-deflate; server_max_window_bits=15", "permessage-deflate; server_max_window_bits=12"),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        ('permessage-deflate; server_max_window_bits="11"', "permessage-deflate; server_max_window_bits=11"),
        # An unacceptable first offer is skipped for the next (section 5.1).
        ("permessage-deflate; colour=blue, permessage-deflate", "permessage-deflate"),
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", "permessage-deflate"),
        ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=9", None),
    ],
)
def test_negotiation_answers_the_first_acceptable_offer(offer: str, response: str | None) -> None:
    parameters = negotiate([offer], DeflateOptions())
    if response is None:  # the last case: check its values instead
        assert parameters is not None
        assert parameters.client_max_window_bits == 9
        assert parameters.response == "permessage-deflate; client_max_window_bits=9"
        return
    assert parameters is not None
    assert parameters.response == response


@pytest.mark.parametrize(
    "offer",
    [
        "",
        "x-custom",
        "permessage-deflate; server_max_window_bits",  # a value is required
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover=1",
    ],
)
def test_invalid_offers_are_declined(offer: str) -> None:
    assert negotiate([offer], DeflateOptions()) is None


@given(st.text(max_size=200))
def test_any_header_value_negotiates_or_declines_without_raising(value: str) -> None:
    parse_extensions([value])
    negotiate([value], DeflateOptions())


def compressed_module(limit: int) -> tuple[WebSocketProtocol, Connection]:
    offer = "permessage-deflate; client_max_window_bits"
    parameters = negotiate([offer], DeflateOptions())
    options = WebSocketProtocol.parse_options(
        [("handler_module", "pywsserver.echo"), ("max_message_size", limit), ("ping_interval", None)], "websocket"
    )
    module = WebSocketProtocol(options, CONNECTION)
    effects = module.start(b"", {"deflate": parameters})
    assert any(isinstance(e, Deliver) for e in effects)
    module.handler_returned(None)
    client_extension = PerMessageDeflate()
    assert parameters is not None
    client_extension.finalize(parameters.response)
    client = Connection(ConnectionType.CLIENT, extensions=[client_extension])
    return module, client


def writes(effects: list[Any]) -> bytes:
    return b"".join(e.data for e in effects if isinstance(e, Write))


def test_compressed_messages_are_inflated_and_replies_compressed() -> None:
    module, client = compressed_module(1 << 20)
    text = "compress me " * 1000
    frame = client.send(TextMessage(data=text))
    assert len(frame) < len(text) // 10
    effects = module.data_received(frame)
    assert [e.message for e in effects if isinstance(e, Deliver)] == [text]
    client.receive_data(writes(module.handler_returned(Reply(text, None))))
    # The reply went out compressed (RSV1) and the client reads it back.
    events = list(client.events())
    assert [e.data for e in events] == [text]


def test_a_compression_bomb_closes_with_1009_holding_memory_near_the_limit() -> None:
    limit = 1 << 20
    module, client = compressed_module(limit)
    bomb = client.send(BytesMessage(data=b"\x00" * (64 << 20)))  # 64 MiB of zeros: about 64 KB on the wire
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        effects = []
        for start in range(0, len(bomb), 16384):  # as it arrives from the network
            effects += module.data_received(bomb[start : start + 16384])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"held {peak} bytes for a {limit}-byte limit"
    client.receive_data(writes(effects))
    closes = [e for e in client.events() if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [1009]


def test_a_compressed_frame_with_corrupt_data_closes_with_1007() -> None:
    module, _ = compressed_module(1 << 20)
    payload = b"\xff\xff\xff\xff" + zlib.compress(b"x")[2:]  # not a raw deflate stream
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = bytes((0xC2, 0x80 | len(payload))) + mask + masked  # FIN, RSV1, binary
    effects = module.data_received(frame)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(writes(effects))
    assert [e.code for e in client.events() if isinstance(e, CloseConnection)] == [1007]
