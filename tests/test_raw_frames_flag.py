"""The WebSocket module's ``raw_frames`` flag (read once per member of every broadcast) always says what
``raw_frames_ok`` computes, whatever the client sends and the server does (hypothesis)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from wsproto.events import CloseConnection, TextMessage

from pywsserver import Close, NoReply
from pywsserver.protocols import CloseAction, Deliver, GoingAway, PingAction, SendAction, WebSocketProtocol

from .test_deflate import compressed_module
from .test_websocket_fastpath import CONNECTION, client_frames, encode

#: What the server side may do between two reads: an action from the mailbox, a timer, the peer's EOF,
#: or the handler answering with a close.
SERVER_STEPS = st.one_of(
    st.just(("action", SendAction("hello"))),
    st.just(("action", PingAction(b"p"))),
    st.builds(lambda code: ("action", CloseAction(code, "bye")), st.sampled_from([1000, 1001, 4000])),
    st.just(("action", GoingAway())),
    st.sampled_from([("timer", "keepalive"), ("timer", "close"), ("timer", "idle"), ("eof", None)]),
    st.just(("handler_close", None)),
)


def _module(fast: bool) -> WebSocketProtocol:
    options = WebSocketProtocol.parse_options(
        [("handler_module", "pywsserver.echo"), ("max_message_size", 1 << 16), ("control_messages", True)], "websocket"
    )
    module = WebSocketProtocol(options, CONNECTION)
    module._fast = fast
    return module


def _drive(module: WebSocketProtocol, steps: list[Any]) -> None:
    """Run the steps; after every call of the module, the flag must agree with the computed answer."""
    close_next = False

    def settle(effects: list[Any]) -> None:
        nonlocal close_next
        assert module.raw_frames == module.raw_frames_ok()
        pending = list(effects)
        while pending:
            effect = pending.pop(0)
            if isinstance(effect, Deliver):
                answer: Any = Close(None) if close_next else NoReply(None)
                close_next = False
                pending = module.handler_returned(answer) + pending
                assert module.raw_frames == module.raw_frames_ok()

    settle(module.start(b"", {}))
    for kind, value in steps:
        if kind == "data":
            settle(module.data_received(value))
        elif kind == "action":
            settle(module.action(value))
        elif kind == "timer":
            settle(module.timer_expired(value))
        elif kind == "eof":
            settle(module.eof_received())
        else:
            close_next = True


@settings(max_examples=int(os.environ.get("PYWSSERVER_FUZZ_EXAMPLES", "300")), deadline=None)
@given(
    reads=st.lists(st.one_of(client_frames().map(lambda frames: ("data", encode(frames))), SERVER_STEPS), max_size=8),
    fast=st.booleans(),
)
# The peer's close behind a message, in both paths: the close waits for the handler's answer.
@example(reads=[("data", encode([TextMessage(data="a"), CloseConnection(code=1000)]))], fast=False)
@example(reads=[("data", encode([TextMessage(data="a"), CloseConnection(code=1000)]))], fast=True)
@example(reads=[("action", CloseAction(1000, "bye"))], fast=True)  # the server closes
@example(reads=[("data", b"\x81\x05hello")], fast=True)  # unmasked: closed at once, from open
def test_the_flag_agrees_with_the_check_after_every_call(reads: list[Any], fast: bool) -> None:
    module = _module(fast)
    assert module.raw_frames and module.raw_frames_ok()  # open, uncompressed: a broadcast frame goes as is
    _drive(module, reads)


def test_a_compressed_connection_never_takes_ready_made_frames() -> None:
    module, _ = compressed_module(1 << 16)
    assert not module.raw_frames and not module.raw_frames_ok()
