"""The WebSocket module, sans-I/O: frames in, handler deliveries and frames out."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, TextMessage
from wsproto.events import Ping as WsPing

from pywsserver import Close, ConnectionClose, NoReply, Ping, Reply, SendPing, SendPong
from pywsserver._messages import Opened
from pywsserver.protocols import (
    CloseAction,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    GoingAway,
    SendAction,
    SetTimer,
    Stop,
    WebSocketProtocol,
    Write,
)

CONNECTION = ConnectionInfo(peer=("127.0.0.1", 5000), local=("127.0.0.1", 8080), connection_id=1)


class Peer:
    """A client's view: encodes frames for the server, decodes what the server writes."""

    def __init__(self) -> None:
        self.ws = Connection(ConnectionType.CLIENT)

    def text(self, data: str, finished: bool = True) -> bytes:
        return self.ws.send(TextMessage(data=data, message_finished=finished))

    def binary(self, data: bytes, finished: bool = True) -> bytes:
        return self.ws.send(BytesMessage(data=data, message_finished=finished))

    def read(self, effects: list[Any]) -> list[Any]:
        for effect in effects:
            if isinstance(effect, Write):
                self.ws.receive_data(effect.data)
        return list(self.ws.events())


def opened(**options: Any) -> WebSocketProtocol:
    merged = {"ping_interval": None, **options}  # keepalive has tests of its own
    raw = [("handler_module", "pywsserver.echo"), *merged.items()]
    module = WebSocketProtocol(WebSocketProtocol.parse_options(raw, "websocket"), CONNECTION)
    effects = module.start(b"", {})
    assert len(effects) == 1
    assert isinstance(effects[0], Deliver)
    assert isinstance(effects[0].message, Opened)
    assert module.handler_returned(None) == []
    return module


def delivered(effects: list[Any]) -> list[Any]:
    return [e.message for e in effects if isinstance(e, Deliver)]


def test_a_text_message_is_delivered_and_a_reply_goes_out_as_text() -> None:
    module, peer = opened(), Peer()
    effects = module.data_received(peer.text("hello"))
    assert delivered(effects) == ["hello"]
    events = peer.read(module.handler_returned(Reply("hello back", None)))
    assert [(type(e), e.data) for e in events] == [(TextMessage, "hello back")]
    events = peer.read(module.handler_returned(NoReply(None)) + module.data_received(peer.binary(b"\x00\xff")))
    assert events == []


def test_binary_is_bytes_and_a_bytes_reply_is_a_binary_frame() -> None:
    module, peer = opened(), Peer()
    assert delivered(module.data_received(peer.binary(b"\x00\xff"))) == [b"\x00\xff"]
    events = peer.read(module.handler_returned(Reply(b"\x01", None)))
    assert isinstance(events[0], BytesMessage)
    assert events[0].data == b"\x01"


def test_messages_wait_in_order_for_the_previous_handler_call() -> None:
    module, peer = opened(), Peer()
    effects = module.data_received(peer.text("one") + peer.text("two") + peer.binary(b"three"))
    assert delivered(effects) == ["one"]
    assert delivered(module.handler_returned(NoReply(None))) == ["two"]
    assert delivered(module.handler_returned(NoReply(None))) == [b"three"]
    assert module.handler_returned(NoReply(None)) == []


def test_fragments_are_reassembled_before_delivery() -> None:
    module, peer = opened(), Peer()
    data = peer.text("frag", finished=False) + peer.text("men", finished=False) + peer.text("ted")
    effects: list[Any] = []
    for i in range(len(data)):  # one byte at a time
        effects += module.data_received(data[i : i + 1])
    assert delivered(effects) == ["fragmented"]


def test_a_message_over_the_limit_closes_1009_and_never_reaches_the_handler() -> None:
    module, peer = opened(max_message_size=10), Peer()
    effects = module.data_received(peer.text("x" * 11))
    assert delivered(effects) == [ConnectionClose(1009, "message larger than 10 bytes")]
    close = [e for e in peer.read(effects) if isinstance(e, CloseConnection)]
    assert close[0].code == 1009
    assert CloseSocket() in effects


def test_the_limit_holds_across_fragments_and_counts_utf8_bytes() -> None:
    module, peer = opened(max_message_size=10), Peer()
    effects = module.data_received(peer.text("é" * 3, finished=False))  # 6 bytes
    assert delivered(effects) == []
    effects = module.data_received(peer.text("é" * 3))  # 12 bytes in all
    assert delivered(effects) == [ConnectionClose(1009, "message larger than 10 bytes")]


def test_a_frame_announcing_a_huge_length_is_refused_at_its_header() -> None:
    module = opened(max_message_size=1024)
    header = bytes([0x82, 0xFF]) + struct.pack("!Q", 2**40) + b"mask"
    effects = module.data_received(header)
    assert delivered(effects) == [ConnectionClose(1009, "message larger than 1024 bytes")]


def test_fragments_over_the_limit_are_refused_as_they_arrive() -> None:
    module = opened(max_message_size=1024)
    header = bytes([0x02, 0xFE]) + struct.pack("!H", 1000) + b"mask"  # a first fragment of 1000 bytes
    effects = module.data_received(header + b"\x00" * 1000)
    assert delivered(effects) == []
    effects = module.data_received(bytes([0x80, 0xFE]) + struct.pack("!H", 1000) + b"mask" + b"\x00" * 100)
    assert delivered(effects) == [ConnectionClose(1009, "message larger than 1024 bytes")]


def test_invalid_utf8_closes_1007() -> None:
    module, peer = opened(), Peer()
    frame = bytearray(peer.binary(b"\xff\xfe"))
    frame[0] = 0x81  # claim it is text
    effects = module.data_received(bytes(frame))
    assert delivered(effects) == [ConnectionClose(1007, delivered(effects)[0].reason)]


def test_an_unmasked_client_frame_closes_1002() -> None:
    module = opened()
    effects = module.data_received(b"\x81\x02hi")
    (notice,) = delivered(effects)
    assert notice.code == 1002


def test_a_ping_is_answered_and_reaches_the_handler_as_ping_with_control_messages_on() -> None:
    module, peer = opened(control_messages=True), Peer()
    effects = module.data_received(peer.ws.send(WsPing(payload=b"are you there")))
    events = peer.read(effects)
    assert events[0].payload == b"are you there"
    assert delivered(effects) == [Ping(b"are you there")]


def test_pings_are_answered_without_reaching_the_handler_by_default() -> None:
    module, peer = opened(), Peer()
    effects = module.data_received(peer.ws.send(WsPing(payload=b"x")))
    assert delivered(effects) == []
    assert len(peer.read(effects)) == 1


def test_messages_before_the_peers_close_are_delivered_then_the_close_is_echoed() -> None:
    module, peer = opened(), Peer()
    effects = module.data_received(peer.text("last words") + peer.ws.send(CloseConnection(code=1000, reason="bye")))
    assert delivered(effects) == ["last words"]
    effects = module.handler_returned(Reply("noted", None))
    events = peer.read(effects)
    assert [type(e) for e in events] == [CloseConnection]  # the peer has closed: replies are dropped
    assert CloseSocket() in effects
    assert delivered(effects) == [ConnectionClose(1000, "bye")]
    assert module.handler_returned(None) == [Stop("connection closed")]


def test_every_result_shape_becomes_the_right_frame() -> None:
    module, peer = opened(), Peer()
    for result, kind in [
        (SendPing(b"p", None), "Ping"),
        (SendPong(b"q", None), "Pong"),
        (Reply("t", None), "TextMessage"),
    ]:
        module.data_received(peer.text("go"))
        events = peer.read(module.handler_returned(result))
        assert type(events[0]).__name__ == kind
    module.data_received(peer.text("go"))
    effects = module.handler_returned(Close(4000, "done", None))
    close = peer.read(effects)[0]
    assert (close.code, close.reason) == (4000, "done")
    assert SetTimer("close", 10.0) in effects


def test_after_our_close_the_peers_answer_ends_the_connection() -> None:
    module, peer = opened(), Peer()
    module.data_received(peer.text("go"))
    peer.read(module.handler_returned(Close(None)))
    effects = module.data_received(peer.ws.send(CloseConnection(code=1000)))
    assert CloseSocket() in effects
    assert delivered(effects) == [ConnectionClose(1000, "")]


def test_messages_after_our_close_are_not_delivered() -> None:
    module, peer = opened(), Peer()
    module.action(CloseAction(1000, ""))
    assert delivered(module.data_received(peer.text("late"))) == []


def test_the_close_timer_gives_up_on_a_silent_peer() -> None:
    module = opened(close_timeout=2)
    assert SetTimer("close", 2.0) in module.action(GoingAway())
    effects = module.timer_expired("close")
    assert CloseSocket() in effects
    assert delivered(effects) == [ConnectionClose(1001, "server shutting down")]


def test_eof_without_close_is_1006_and_delivered_once() -> None:
    module = opened()
    effects = module.eof_received()
    assert delivered(effects) == [ConnectionClose(1006, "connection lost")]
    assert module.eof_received() == []


def test_a_failing_handler_closes_1011_and_later_messages_are_dropped() -> None:
    module, peer = opened(), Peer()
    module.data_received(peer.text("boom") + peer.text("after"))
    effects = module.handler_failed(RuntimeError("boom"))
    close = [e for e in peer.read(effects) if isinstance(e, CloseConnection)]
    assert close[0].code == 1011
    assert delivered(effects) == []


def test_send_actions_become_frames_and_are_dropped_once_closing() -> None:
    module, peer = opened(), Peer()
    events = peer.read(module.action(SendAction("pushed")) + module.action(SendAction(b"raw")))
    assert [e.data for e in events if isinstance(e, Message)] == ["pushed", b"raw"]
    module.action(CloseAction(1000, ""))
    assert module.action(SendAction("too late")) == []


def test_frames_arriving_with_the_handshake_are_handled_after_init() -> None:
    peer = Peer()
    module = WebSocketProtocol(
        WebSocketProtocol.parse_options([("handler_module", "pywsserver.echo")], "ws"), CONNECTION
    )
    effects = module.start(peer.text("early"), {})
    assert isinstance(delivered(effects)[0], Opened)
    assert delivered(module.handler_returned(None)) == ["early"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], r"websocket\.handler_module: required"),
        ([("handler_module", "pywsserver.echo"), ("max_message_size", 0)], r"websocket\.max_message_size"),
        ([("handler_module", "pywsserver.echo"), ("colour", "blue")], r"websocket\.colour: unknown option"),
    ],
)
def test_bad_module_options_name_their_path(options: list[Any], message: str) -> None:
    from pywsserver import OptionError

    with pytest.raises(OptionError, match=message):
        WebSocketProtocol.parse_options(options, "websocket")


def test_frames_sent_with_the_handshake_keep_the_timers_and_reach_the_handler_after_init() -> None:
    raw = [("handler_module", "pywsserver.echo"), ("ping_interval", 20), ("idle_timeout", 60)]
    module = WebSocketProtocol(WebSocketProtocol.parse_options(raw, "websocket"), CONNECTION)
    effects = module.start(Peer().text("early"), {})
    assert SetTimer("keepalive", 20) in effects and SetTimer("idle", 60) in effects
    assert isinstance(effects[-1], Deliver) and isinstance(effects[-1].message, Opened)
    assert module.handler_returned(None) == [Deliver("early")]
