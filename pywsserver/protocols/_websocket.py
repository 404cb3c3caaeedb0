"""The WebSocket protocol module: frames in, complete messages to the handler, results out as frames.

Theory of operation
-------------------
Built on wsproto's frame-level `wsproto.connection.Connection`. The
connection's life is four states; every transition is in this table:

==============  =========================================  ==============
state           event                                      next state
==============  =========================================  ==============
OPEN            peer's close frame arrives                 REMOTE_CLOSING (nothing more is read)
REMOTE_CLOSING  that close frame reaches the handler       CLOSED (we echo it, close the socket)
OPEN            handler result ``Close`` / ``close()``     LOCAL_CLOSING (close frame sent, timer)
OPEN            protocol violation or message too big      CLOSED (close 1002/1007/1009 sent)
OPEN            EOF without a close frame                  CLOSED (code 1006)
REMOTE_CLOSING  EOF before the close reached the handler   CLOSED (code 1006)
LOCAL_CLOSING   peer's close frame                         CLOSED
LOCAL_CLOSING   ``close`` timer expires, or EOF            CLOSED
CLOSED          ``connection_close`` handled               (worker stops)
==============  =========================================  ==============

Two parsers, one behaviour. While the connection is OPEN and nothing unusual
arrives, the module parses frames itself: whole unfragmented text and binary
frames, pings, pongs and a valid close frame (a status code RFC 6455 allows
and a UTF-8 reason). At the first frame it does not take (a fragment, a
reserved bit or opcode, an unmasked frame, a frame over the size limit, a
close frame it would have to refuse) it hands that frame and every later
byte to wsproto, which has seen nothing until then; once the server has sent
a close frame wsproto parses everything. ``tests/test_websocket_fastpath.py``
checks with hypothesis that both paths deliver the same messages and write
the same bytes for any client input split anywhere.

Messages reach the handler one at a time and in order, through an inbox:
each `Deliver` is answered by
``handler_returned`` before the next one is emitted. Fragments are joined
first; the size limit is checked as fragments (and partial frames) arrive,
so memory stays near ``max_message_size`` whatever a frame announces. A
peer's close frame waits in the inbox behind the messages that came before
it, so those are delivered before the close is echoed (replies to them are
dropped: the peer has closed its side). When the connection fails (a
protocol violation, a lost connection), the messages that had fully arrived
before are still delivered, then the `ConnectionClose` notice, after which
the module asks the worker to stop.
"""

from __future__ import annotations

import codecs
import enum
import io
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    TextMessage,
)
from wsproto.events import (
    Ping as WsPing,
)
from wsproto.events import (
    Pong as WsPong,
)
from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, Frame, FrameDecoder, FrameProtocol, Opcode, RsvBits

from .._messages import (
    Close,
    ConnectionClose,
    NoReply,
    Opened,
    Ping,
    Pong,
    Reply,
    SendPing,
    SendPong,
)
from ._contract import (
    Action,
    BroadcastAction,
    CloseAction,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    Effect,
    GoingAway,
    PingAction,
    SendAction,
    SetTimer,
    Stop,
    Write,
)
from ._deflate import BoundedDeflate
from ._endpoint import WebSocketOptions, parse_websocket_options
from ._frames import BAD_UTF8, INCOMPLETE, OTHER, SPEEDUPS, Parsed, encode_frame
from ._mask import unmask

__all__ = ["WebSocketOptions", "WebSocketProtocol", "encode_message"]


def _message_event(data: str | bytes) -> Message[Any]:
    """The wsproto event sending ``data`` as one message."""
    return TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)


def encode_message(data: str | bytes) -> bytes:
    """One unfragmented, unmasked (server-to-client) frame: text for ``str``, binary for ``bytes``."""
    return encode_frame(data)


# The C parser of whole frames (see ``_frames``), or None: then the Python loop of ``_receive_fast``
# parses every frame (``tests/test_frames.py`` holds both to the same answers).
_parse_frames: Callable[[bytes | bytearray | memoryview, int], Parsed] | None = None
if SPEEDUPS:
    from ._frames import parse_frames as _parse_frames


class State(enum.Enum):
    """The WebSocket connection's state (see the table in the module docstring)."""

    OPEN = "open"
    REMOTE_CLOSING = "remote_closing"
    LOCAL_CLOSING = "local_closing"
    CLOSED = "closed"


# The members as module globals, read so in the per-connection paths: on Python 3.11 reading a
# member from its Enum class goes through ``EnumType.__getattr__`` (about 1,000 instructions under
# callgrind, a global read a few dozen; see `pywsserver._core`).
_OPEN, _REMOTE_CLOSING, _LOCAL_CLOSING, _CLOSED = State.OPEN, State.REMOTE_CLOSING, State.LOCAL_CLOSING, State.CLOSED
_WS_OPEN, _WS_REMOTE_CLOSING, _WS_CLOSED = ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED


class _SizeGuard(Extension):
    """Not a negotiated extension: wsproto shows every frame header to its extensions, and this one
    refuses, before any of the frame's payload is read, a message whose frames announce more than the
    size limit or that comes in more than ``max_fragments`` frames (empty ones included).

    A compressed message (RSV1 on its first frame) is bounded after inflation (`BoundedDeflate`): its
    frames' lengths on the wire are only held to twice the limit plus 64 KiB, far above what deflate
    adds to incompressible data, so that a stream inflating to nothing cannot run forever either."""

    name = "pywsserver-size-guard"

    def __init__(self, limit: int, max_fragments: int, compressed: bool) -> None:
        self.limit = limit
        self.max_fragments = max_fragments
        self.compression = compressed  # permessage-deflate was agreed
        self.compressed = False  # the message being read is compressed
        self.frames = 0  # frames of the message being read
        self.announced = 0  # bytes its frames announced so far
        # What the three above were before the header being read: wsproto reads a header again when
        # its mask had not arrived yet, and a header read twice must count once.
        self._before: tuple[int, int, bool] | None = None
        #: Why the last refusal (the close frame's reason).
        self.refusal = ""

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            return RsvBits(False, False, False)
        if self._before is not None:  # the same header again
            self.frames, self.announced, self.compressed = self._before
        self._before = (self.frames, self.announced, self.compressed)
        if opcode is Opcode.CONTINUATION:
            self.frames += 1
            if self.frames > self.max_fragments:
                self.refusal = f"message in more than {self.max_fragments} frames"
                return CloseReason.MESSAGE_TOO_BIG
            self.announced += payload_length
        else:
            self.frames, self.announced = 1, payload_length
            self.compressed = self.compression and rsv.rsv1
        if self.announced > (2 * self.limit + 65536 if self.compressed else self.limit):
            self.refusal = f"message larger than {self.limit} bytes"
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        self._before = None  # the header was read for good
        return data

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        self._before = None
        return None


class _FrameProtocol(FrameProtocol):
    """wsproto's frame parser taking the close code 1014 (Bad Gateway, in RFC 6455's registry since
    2012), which wsproto's list of codes lacks and would refuse with 1002."""

    def _process_close(self, frame: Frame) -> Frame:
        data = frame.payload
        if isinstance(data, bytes | bytearray) and len(data) >= 2 and data[:2] == b"\x03\xf6":
            try:
                reason = bytes(data[2:]).decode("utf-8")
            except UnicodeDecodeError:
                pass  # wsproto says why
            else:
                return Frame(frame.opcode, (1014, reason), frame.frame_finished, frame.message_finished)
        return super()._process_close(frame)


#: What every end of a connection does first: close the socket (effects are frozen: shared). Its timers
#: are not stopped one by one: a closed module answers no timer (`timer_expired`), and the `Stop` that
#: follows the close notice ends them all (four effects fewer per connection; with the HTTP module's
#: timer left to its Switch, 492,900 to 484,300 instructions per handshake under callgrind).
_ON_CLOSED: tuple[Effect, ...] = (CloseSocket(),)


class _PeerClosed:
    """The peer's close frame, waiting in the inbox behind the messages sent before it."""

    __slots__ = ("code", "reason", "reply")

    def __init__(self, code: int, reason: str, reply: bytes | None) -> None:
        self.code = code
        self.reason = reason
        #: The close frame echoing it (made by the fast path), or ``None``: wsproto makes it.
        self.reply = reply


_FAST_OPCODES = frozenset((1, 2, 8, 9, 10))
# Status codes a peer may send (RFC 6455 7.4.1, 7.4.2, and the registry's 1012 to 1014); the fast
# path takes a close frame only with one of these, wsproto (with _FrameProtocol's 1014) judges any other.
_VALID_CLOSE_CODES = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, *range(3000, 5000))
)
_UTF8 = codecs.getincrementaldecoder("utf-8")


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class WebSocketProtocol:
    """RFC 6455 after the handshake, as a protocol module."""

    name: ClassVar[str] = "websocket"
    handshake: ClassVar[bool] = False

    # One per connection for its whole life: slots, and nothing made before it is needed.
    __slots__ = (
        "_awaiting",
        "_carry",
        "_checked",
        "_close_code",
        "_close_reason",
        "_deflate_extension",
        "_fast",
        "_guard",
        "_idle_timer",
        "_inbox",
        "_message",
        "_next",
        "_notified",
        "_ping_payload",
        "_pings_sent",
        "_size",
        "_utf8",
        "_violation",
        "_ws",
        "closed_by",
        "connection",
        "messages_out",
        "options",
        "raw_frames",
        "state",
    )

    @classmethod
    def parse_options(cls, raw: Any, path: str) -> WebSocketOptions:
        """Check the module's options (see `WebSocketOptions`)."""
        return parse_websocket_options(raw, path)

    def __init__(self, options: WebSocketOptions, connection: ConnectionInfo) -> None:
        self.options = options
        self.connection = connection
        self.state = _OPEN
        #: Whether a frame encoded once for many connections (a broadcast) may be written as is: what
        #: `raw_frames_ok` answers, kept up to date where it changes (compression negotiated, each
        #: change of ``state``) so that a broadcast reads an attribute per member instead of a call.
        self.raw_frames = True
        # wsproto's connection (with its extensions) is made when first needed (a fragment, a
        # close we send, a ping to send, compression): an idle connection does without it.
        self._ws: Connection | None = None
        self._guard: _SizeGuard | None = None
        self._deflate_extension: BoundedDeflate | None = None
        # Messages waiting for the handler: a list read from ``_next`` (a deque costs 760 bytes even empty).
        self._inbox: list[Any] = []
        self._next = 0
        self._awaiting: Any = None  # the message whose handler call is outstanding
        # A fragmented message being reassembled (in wsproto's path): one growing buffer, never a list of parts.
        self._message: bytearray | io.StringIO | None = None
        self._size = 0
        self._violation: str | None = None  # why we closed, when the peer broke the protocol
        self._close_code = 1006
        self._close_reason = ""
        self._notified = False
        self._fast = True  # see _receive_fast
        self._carry: bytes | bytearray = b""  # an incomplete frame (a bytearray once there is one)
        # The UTF-8 check of an incomplete text frame in ``_carry``, and how much of its payload it has read.
        self._utf8: codecs.IncrementalDecoder | None = None
        self._checked = 0
        self._ping_payload: bytes | None = None  # the keepalive ping waiting for its pong
        self._pings_sent = 0
        self._idle_timer = SetTimer("idle", options.idle_timeout) if options.idle_timeout is not None else None
        #: Who began the close: ``"client"`` (its close frame, or it dropped the connection) or
        #: ``"server"`` (a close frame of ours: the handler, ``close``, a timeout, a protocol error).
        self.closed_by: str | None = None
        #: Messages written (replies, ``send``, broadcasts encoded here), for the access log and metrics.
        self.messages_out = 0

    # ------------------------------------------------------------- inputs

    def start(self, data: bytes, context: Mapping[str, Any]) -> list[Effect]:
        """The handshake is done: have the handler's ``init`` run, then handle ``data``."""
        info = context.get("info")
        if info is None:
            request = context.get("request")
            info = self.connection.handler_info()
            if request is not None:
                info.update(path=request.path, query=request.query, headers=request.headers, request=request)
        parameters = context.get("deflate")
        if parameters is not None and self.options.compression is not None:
            self._deflate_extension = BoundedDeflate(
                parameters, self.options.compression, self.options.max_message_size
            )
            self.raw_frames = False  # each connection compresses with its own context
        self._inbox.append(Opened(info, context.get("handler")))
        effects: list[Effect] = []
        if self.options.ping_interval is not None:
            effects.append(SetTimer("keepalive", self.options.ping_interval))
        if self._idle_timer is not None:
            effects.append(self._idle_timer)
        if data:
            effects += self._receive(data)
        return effects + self._pump()

    def data_received(self, data: bytes) -> list[Effect]:
        """Parse frames; queue complete messages for the handler."""
        if self.state is _CLOSED or self.state is _REMOTE_CLOSING:
            return []  # after the peer's close frame nothing more is read (as wsproto does)
        if self._idle_timer is not None:
            return [self._idle_timer, *self._receive(data), *self._pump()]
        return self._receive(data) + self._pump()

    def eof_received(self) -> list[Effect]:
        """The peer went away; without a close frame that is code 1006."""
        if self.state is _CLOSED:
            return []
        if self.closed_by is None:
            self.closed_by = "client"
        return self._closed(1006, "connection lost")

    def action(self, action: Action) -> list[Effect]:
        """Send, ping or close on behalf of another task; dropped once closing has begun."""
        if not self._can_send():
            return []
        if isinstance(action, BroadcastAction):
            self.messages_out += 1
            return [Write(self._frame(action.data) if self._deflate_extension is not None else action.frame)]
        if isinstance(action, SendAction):
            self.messages_out += 1
            return [Write(self._frame(action.data))]
        if isinstance(action, PingAction):
            return [Write(self._wsproto().send(WsPing(payload=action.data)))]
        if isinstance(action, CloseAction):
            return self._start_closing(action.code, action.reason)
        if isinstance(action, GoingAway):
            return self._start_closing(1001, "server shutting down")
        return []

    def timer_expired(self, name: str) -> list[Effect]:
        """Keepalive, idle and closing-handshake timers."""
        if name == "close" and self.state is _LOCAL_CLOSING:
            return self._closed(self._close_code, self._close_reason)
        if self.state is not _OPEN:
            return []
        if name == "keepalive":
            return self._keepalive()
        if name == "pong" and self._ping_payload is not None:
            # No pong in time: the peer or the path to it is gone; do not wait for a closing handshake.
            return self._fail(1011, "keepalive ping timeout")
        if name == "idle":
            return self._start_closing(1001, "idle timeout")
        return []

    def _keepalive(self) -> list[Effect]:
        assert self.options.ping_interval is not None
        effects: list[Effect] = [SetTimer("keepalive", self.options.ping_interval)]
        if self._ping_payload is None and self._can_send():
            self._pings_sent += 1
            self._ping_payload = self._pings_sent.to_bytes(4, "big")
            effects.append(Write(self._wsproto().send(WsPing(payload=self._ping_payload))))
            if self.options.ping_timeout is not None:
                effects.append(SetTimer("pong", self.options.ping_timeout))
        return effects

    def _pong_received(self, payload: bytes) -> list[Effect]:
        if self._ping_payload is not None and payload == self._ping_payload:
            self._ping_payload = None
            return [SetTimer("pong", None)]
        return []

    def handler_returned(self, result: Any) -> list[Effect]:
        """Turn the handler's result into frames, then deliver the next message."""
        delivered, self._awaiting = self._awaiting, None
        if isinstance(delivered, ConnectionClose):
            return [self._stop()]
        effects: list[Effect] = []
        if self._can_send() and result is not None and not isinstance(result, NoReply):
            if isinstance(result, Reply):
                self.messages_out += 1
                effects.append(Write(self._frame(result.data)))
            elif isinstance(result, SendPing):
                effects.append(Write(self._wsproto().send(WsPing(payload=result.data))))
            elif isinstance(result, SendPong):
                effects.append(Write(self._wsproto().send(WsPong(payload=result.data))))
            elif isinstance(result, Close):
                effects += self._start_closing(result.code, result.reason)
        return effects + self._pump()

    def handler_failed(self, error: BaseException) -> list[Effect]:
        """The handler raised or returned nonsense: close with 1011 (internal error)."""
        delivered, self._awaiting = self._awaiting, None
        if isinstance(delivered, ConnectionClose):
            return [self._stop()]
        self._inbox = [m for m in self._inbox[self._next :] if isinstance(m, _PeerClosed)]
        self._next = 0
        effects = self._start_closing(1011, "internal error") if self._can_send() else []
        return effects + self._pump()

    # ------------------------------------------------- the steady state's shortcut

    def steady_parameters(self) -> tuple[int, float | None] | None:
        """Whether the next read may take the connection core's steady path (``ConnectionCore._steady_read``).

        ``None`` when it may not: the connection is not open, or a frame is carried from an earlier
        read, messages wait or one is being handled, frames go to wsproto, compression is on (a
        reply is compressed), or a close frame was sent. Otherwise ``(max_message_size, idle
        timeout)``: the read is parsed with that limit, the idle timer (if any) restarts first, as
        `data_received` does, and whole text and binary messages go to the handler one after the
        other; a read of anything else goes to `steady_parsed`. The answer holds until the core
        next gives the module anything to do: the core asks again after that.
        """
        if (
            not self._fast
            or self._carry
            or self._awaiting is not None
            or self._inbox
            or self._deflate_extension is not None
            or not self._can_send()
        ):
            return None
        return self.options.max_message_size, self.options.idle_timeout

    def steady_parsed(self, data: bytes, parsed: Parsed) -> list[Effect]:
        """A read of the steady path that was not only whole text and binary frames: what
        `data_received` would return for ``data``, ``parsed`` being its frames (not parsed twice;
        the idle timer has been restarted already)."""
        return [*self._receive_parsed(data, parsed), *self._pump()]

    def steady_resume(self, message: str | bytes, rest: list[str | bytes]) -> None:
        """Back to the general path: ``message`` (from the steady path) is being handled, ``rest``
        wait behind it, as if they had come through `data_received` (the core then calls
        `handler_returned` or `handler_failed` for ``message``)."""
        self._awaiting = message
        self._inbox = rest
        self._next = 0

    # ------------------------------------------------------------ helpers

    def raw_frames_ok(self) -> bool:
        """Whether a frame encoded once for many connections (a broadcast) may be written as is
        (what ``raw_frames`` holds; the tests hold the two equal)."""
        if self._deflate_extension is not None or self.state is not _OPEN:
            return False
        ws = self._ws
        return ws is None or ws.state is _WS_OPEN

    def _wsproto(self) -> Connection:
        """wsproto's connection, made on first use."""
        ws = self._ws
        if ws is None:
            options = self.options
            guard = self._guard = _SizeGuard(
                options.max_message_size, options.max_fragments, self._deflate_extension is not None
            )
            extensions: list[Extension] = [guard]
            if self._deflate_extension is not None:
                extensions.append(self._deflate_extension)
            ws = self._ws = Connection(ConnectionType.SERVER, extensions=extensions)
            ws._proto = _FrameProtocol(False, extensions)  # nothing parsed yet: the same parser, taking 1014
        return ws

    def _can_send(self) -> bool:
        # Neither side has sent a close frame yet.
        ws = self._ws
        return self.state is _OPEN and (ws is None or ws.state is _WS_OPEN)

    def _frame(self, data: str | bytes) -> bytes:
        if self._deflate_extension is not None:
            return self._wsproto().send(_message_event(data))  # compressed by the extension
        # Whole, unfragmented messages leave wsproto's sending state untouched: encode them directly.
        return encode_frame(data)

    def _receive(self, data: bytes) -> list[Effect]:
        if self._fast:
            if self._carry or _parse_frames is None:
                return self._receive_fast(data)
            return self._receive_frames(data, _parse_frames)
        return self._receive_wsproto(data)

    def _receive_frames(self, data: bytes, parse: Callable[[bytes | bytearray, int], Parsed]) -> list[Effect]:
        return self._receive_parsed(data, parse(data, self.options.max_message_size))

    def _receive_parsed(self, data: bytes, parsed: Parsed) -> list[Effect]:
        """The fast path in C: the whole frames of a read parsed, unmasked and checked in one call.

        What it buys: the per-frame work of ``_receive_fast`` (header, mask, unmask, UTF-8 check) in
        one C call instead of a dozen Python operations; with the C frame encoder, a 64-byte echoed
        message went from 90,600 to 85,000 instructions under callgrind (``benchmarks/instructions.py``),
        and a read of many frames makes one call, not one loop turn per frame. It takes the same
        frames as ``_receive_fast`` and gives the same answers; what it leaves (a frame not complete
        yet, a frame it does not take, a close frame's payload) is judged as ``_receive_fast`` does.
        """
        items, position, stop, detail = parsed
        effects: list[Effect] = []
        inbox = self._inbox
        for item in items:
            if type(item) is not tuple:
                inbox.append(item)  # a text (str) or binary (bytes) message
                continue
            opcode, payload = item
            if opcode == 9:
                if self._can_send():
                    effects.append(Write(bytes((0x8A, len(payload))) + payload))
                if self.options.control_messages:
                    inbox.append(Ping(payload))
            elif opcode == 10:
                if self._ping_payload is not None:
                    effects += self._pong_received(payload)
                if self.options.control_messages:
                    inbox.append(Pong(payload))
            else:  # 8: a close frame (the last item); what follows it is never read
                peer_closed = self._peer_close(payload)
                if peer_closed is None:  # a close frame wsproto refuses: let it say why
                    self._fast = False
                    return effects + self._receive_wsproto(data[position:])
                inbox.append(peer_closed)
                return effects
        if stop == INCOMPLETE:
            if position < len(data):  # the start of a frame: the Python loop keeps it (and checks its text)
                effects += self._receive_fast(data[position:] if position else data)
        elif stop == OTHER:  # a frame this path does not take: wsproto from here on
            self._fast = False
            effects += self._receive_wsproto(data[position:])
        elif stop == BAD_UTF8:
            assert detail is not None
            effects += self._fail(1007, detail)
        return effects

    def _receive_fast(self, data: bytes) -> list[Effect]:
        """Parse whole data frames, pings, pongs and a valid close frame here; hand anything else to wsproto.

        wsproto stays the authority: at the first frame this path does not take (a fragment, a close
        frame it would refuse, reserved bits or opcodes, an unmasked frame, a frame over the size limit)
        the bytes from that frame on, and every byte after, go to wsproto, which has seen nothing until then.
        """
        if self._carry:
            self._carry += data  # a bytearray: a large frame arriving in parts is not copied again and again
            buffer: bytes | bytearray = self._carry
            self._carry = b""
        else:
            buffer = data
        size, position = len(buffer), 0
        effects: list[Effect] = []
        limit = self.options.max_message_size
        inbox = self._inbox
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            opcode = first & 0x0F
            if first & 0x70 or not first & 0x80 or not second & 0x80 or opcode not in _FAST_OPCODES:
                break  # reserved bits, a fragment, an unmasked frame, a close or reserved opcode
            length, header = second & 0x7F, 2
            if length == 126:
                if size - position < 4:
                    self._keep(buffer, position)
                    return effects
                length, header = int.from_bytes(buffer[position + 2 : position + 4], "big"), 4
            elif length == 127:
                if size - position < 10:
                    self._keep(buffer, position)
                    return effects
                length, header = int.from_bytes(buffer[position + 2 : position + 10], "big"), 10
            if length > limit or (opcode > 2 and length > 125):
                break
            end = position + header + 4 + length
            if end > size:  # a frame not complete yet, within the size limit: keep it
                # A large text frame's UTF-8 is checked as it arrives (a small one is checked once whole).
                if opcode == 1 and length >= 4096 and size > position + header + 4:
                    failure = self._check_text(buffer, position + header + 4, size)
                    if failure is not None:
                        return effects + self._fail(1007, failure)
                self._keep(buffer, position)
                return effects
            mask = buffer[position + header : position + header + 4]
            payload = unmask(buffer[position + header + 4 : end], mask)
            start, position = position, end
            if opcode == 1:
                if self._utf8 is not None:  # checked in part already: the rest, as wsproto would
                    failure = self._check_text(buffer, start + header + 4, end, final=True)
                    if failure is not None:
                        return effects + self._fail(1007, failure)
                try:
                    inbox.append(payload.decode("utf-8"))
                except UnicodeDecodeError as error:
                    return effects + self._fail(1007, str(error))
            elif opcode == 2:
                inbox.append(payload)
            elif opcode == 9:
                if self._can_send():
                    effects.append(Write(bytes((0x8A, length)) + payload))
                if self.options.control_messages:
                    inbox.append(Ping(payload))
            elif opcode == 10:
                if self._ping_payload is not None:
                    effects += self._pong_received(payload)
                if self.options.control_messages:
                    inbox.append(Pong(payload))
            else:  # 8: a close frame; what follows it is never read
                peer_closed = self._peer_close(payload)
                if peer_closed is None:  # a close frame wsproto refuses: let it say why
                    position = start
                    break
                inbox.append(peer_closed)
                return effects
        if position < size:
            if size - position >= 2:  # a frame this path does not take: wsproto from here on
                self._fast = False
                return effects + self._receive_wsproto(bytes(buffer[position:]))
            self._keep(buffer, position)
        return effects

    def _peer_close(self, payload: bytes) -> _PeerClosed | None:
        """The peer's valid close frame, as wsproto would take it; ``None`` if wsproto would refuse it."""
        if not payload:
            code, reason = 1005, ""  # no status code (RFC 6455 7.1.5); echoed as an empty close frame
        elif len(payload) == 1:
            return None
        else:
            code = int.from_bytes(payload[:2], "big")
            if code not in _VALID_CLOSE_CODES:
                return None
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return None
        self.state = _REMOTE_CLOSING
        self.raw_frames = False
        if self.closed_by is None:
            self.closed_by = "client"
        return _PeerClosed(code, reason, bytes((0x88, len(payload))) + payload)

    def _check_text(self, buffer: bytes | bytearray, payload: int, end: int, *, final: bool = False) -> str | None:
        """Check the UTF-8 of a text frame's payload that arrived since the last check (up to ``end``);
        ``payload`` is where the payload starts in ``buffer``, after the 4-byte mask. Returns why it is
        invalid, or ``None``."""
        decoder = self._utf8
        if decoder is None:
            decoder = self._utf8 = _UTF8()
            self._checked = 0
        checked = self._checked
        mask = bytes(buffer[payload - 4 : payload])
        shift = checked % 4
        if shift:
            mask = mask[shift:] + mask[:shift]
        try:
            decoder.decode(unmask(buffer[payload + checked : end], mask), final)
        except UnicodeDecodeError as error:
            self._utf8 = None
            return str(error)
        if final:
            self._utf8 = None
        else:
            self._checked = end - payload
        return None

    def _keep(self, buffer: bytes | bytearray, position: int) -> None:
        self._carry = buffer if position == 0 and isinstance(buffer, bytearray) else bytearray(buffer[position:])

    def _leave_fast_path(self) -> list[Effect]:
        """From now on wsproto parses everything (for instance once we have sent a close frame)."""
        self._fast = False
        self._utf8 = None  # wsproto reads the carried frame again from its start
        carry, self._carry = self._carry, b""
        return self._receive_wsproto(bytes(carry)) if carry else []

    def _receive_wsproto(self, data: bytes) -> list[Effect]:
        ws = self._wsproto()
        try:
            ws.receive_data(data)
        except Exception:  # wsproto refuses data after it considers the connection closed
            return []
        effects: list[Effect] = []
        limit = self.options.max_message_size
        for event in ws.events():
            if isinstance(event, Message):
                chunk = event.data
                size = _text_size(chunk) if isinstance(chunk, str) else len(chunk)
                message = self._message
                if event.message_finished and message is None:
                    if size > limit:
                        return effects + self._fail(1009, f"message larger than {limit} bytes")
                    self._inbox.append(chunk if isinstance(chunk, str | bytes) else bytes(chunk))
                    continue
                self._size += size
                if self._size > limit:
                    return effects + self._fail(1009, f"message larger than {limit} bytes")
                # One growing buffer per message, whatever the framing (frames and parts of frames).
                if message is None:
                    message = self._message = io.StringIO() if isinstance(chunk, str) else bytearray()
                if isinstance(message, io.StringIO):
                    message.write(chunk)
                else:
                    message += chunk
                if event.message_finished:
                    self._message, self._size = None, 0
                    self._inbox.append(message.getvalue() if isinstance(message, io.StringIO) else bytes(message))
            elif isinstance(event, WsPing):
                if self.state is _OPEN:
                    effects.append(Write(ws.send(event.response())))
                if self.options.control_messages:
                    self._inbox.append(Ping(bytes(event.payload)))
            elif isinstance(event, WsPong):
                if self._ping_payload is not None:
                    effects += self._pong_received(bytes(event.payload))
                if self.options.control_messages:
                    self._inbox.append(Pong(bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if ws.state is _WS_REMOTE_CLOSING:
                    self.state = _REMOTE_CLOSING
                    self.raw_frames = False
                    if self.closed_by is None:
                        self.closed_by = "client"
                    self._inbox.append(_PeerClosed(int(event.code), event.reason or "", None))
                elif ws.state is _WS_CLOSED:  # the answer to our close frame
                    return effects + self._closed(self._close_code, self._close_reason)
                else:  # wsproto found a protocol violation (1002, 1007, 1009 from the size guard, ...)
                    reason = event.reason or ""
                    if event.code == CloseReason.MESSAGE_TOO_BIG:
                        guard = self._guard
                        reason = (guard.refusal if guard else "") or f"message larger than {limit} bytes"
                    return effects + self._fail(event.code, reason)
        return effects

    def _pump(self) -> list[Effect]:
        inbox = self._inbox
        if self._awaiting is not None or self._next >= len(inbox):
            return []
        message = inbox[self._next]
        self._next += 1
        if self._next == len(inbox):
            inbox.clear()
            self._next = 0
        elif self._next >= 64 and self._next * 2 >= len(inbox):  # never drained: drop what was read
            del inbox[: self._next]
            self._next = 0
        if isinstance(message, _PeerClosed):
            effects: list[Effect] = []
            if message.reply is not None:
                effects.append(Write(message.reply))
            else:
                ws = self._wsproto()
                if ws.state is _WS_REMOTE_CLOSING:
                    # No status code received: echoed as a close frame without one (wsproto
                    # recognises 1005 only as its enum member).
                    code = CloseReason.NO_STATUS_RCVD if message.code == 1005 else message.code
                    effects.append(Write(ws.send(CloseConnection(code=code, reason=message.reason))))
            return effects + self._closed(message.code, message.reason)
        if self.state is _LOCAL_CLOSING and not isinstance(message, ConnectionClose):
            self._inbox.clear()  # sent after our close frame: dropped
            self._next = 0
            return []
        self._awaiting = message
        return [Deliver(message)]

    def _start_closing(self, code: int, reason: str) -> list[Effect]:
        if self.closed_by is None:
            self.closed_by = "server"
        self.state = _LOCAL_CLOSING
        self.raw_frames = False
        self._close_code, self._close_reason = code, reason
        write = Write(self._wsproto().send(CloseConnection(code=code, reason=reason)))
        # The peer's answer moves wsproto's closing state: wsproto parses from now on.
        return [write, SetTimer("close", self.options.close_timeout), *self._leave_fast_path()]

    def _stop(self) -> Stop:
        """The last effect: a close we started because the peer broke the protocol is reported as bad input."""
        if self._violation is not None:
            return Stop(self._violation, bad_input=True)
        return Stop("connection closed")

    def _fail(self, code: int, reason: str) -> list[Effect]:
        if self.closed_by is None:
            self.closed_by = "server"
        if code in (1002, 1007, 1009):  # the peer's fault (not a 1011 of ours)
            self._violation = f"closed {code} {reason!r}"
        effects: list[Effect] = []
        ws = self._wsproto()
        if ws.state is _WS_OPEN:
            effects.append(Write(ws.send(CloseConnection(code=code, reason=reason))))
        return effects + self._closed(code, reason)

    def _closed(self, code: int, reason: str) -> list[Effect]:
        was_open = self.state is _OPEN or self.state is _REMOTE_CLOSING
        self.state = _CLOSED
        self.raw_frames = False
        self._message, self._size, self._utf8 = None, 0, None
        # Messages that had fully arrived while the connection was open are still delivered (without
        # replies), then the close notice: what the handler sees does not depend on whether the
        # violation was found in the same read. Nothing is delivered if init has not run yet.
        pending = self._inbox[self._next :]
        if was_open and not any(isinstance(m, Opened) for m in pending) and not isinstance(self._awaiting, Opened):
            self._inbox = [m for m in pending if isinstance(m, str | bytes | Ping | Pong)]
        else:
            self._inbox = []
        self._next = 0
        effects: list[Effect] = list(_ON_CLOSED)
        if not self._notified:
            self._notified = True
            self._inbox.append(ConnectionClose(code, reason))
        if self._awaiting is None:
            effects += self._pump()
        return effects
