"""permessage-deflate (RFC 7692): negotiating it in the handshake, and inflating with a bound.

The HTTP module calls `negotiate` with the client's
``Sec-WebSocket-Extensions`` offers and the server's `DeflateOptions`;
it answers with the response header value and the parameters agreed. The
WebSocket module then builds a `BoundedDeflate` (wsproto's
``PerMessageDeflate`` with two changes) for its wsproto connection:

* inflating is bounded: each call to the decompressor may produce at most
  what is left of ``max_message_size`` plus one byte, so a small compressed
  frame that inflates to gigabytes ("zip bomb") closes the connection with
  1009 having held at most the limit in memory;
* the compressor's window and memory level are the server's options (a
  smaller window and level cost less memory per connection);
* a control frame (a ping) between the fragments of a compressed message
  leaves the message's inflation alone (wsproto's class ends the message
  there, garbling it and the next one).

A client's offer of ``client_max_window_bits=8`` is answered with 8 (RFC
7692 section 7.1.2.2: at most what the client offered); the server inflates
with a 9-bit window, which reads both what an 8-bit compressor writes and
what zlib writes when asked for 8 (zlib's raw deflate uses 9 then).

Pure functions and zlib objects: no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import attrs
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

__all__ = ["BoundedDeflate", "DeflateOptions", "DeflateParameters", "negotiate", "parse_extensions"]


@attrs.frozen
class DeflateOptions:
    """The server's permessage-deflate settings (the ``compression`` option)."""

    #: The LZ77 window of the server's compressor, 9 to 15 (2**bits bytes).
    server_max_window_bits: int = 12
    #: zlib's memory level of the compressor, 1 to 9 (more memory, slightly better and faster).
    memory_level: int = 5
    #: zlib's compression level, 0 to 9 (-1 for zlib's default, 6).
    compression_level: int = 6
    #: Ask clients that allow it to use at most this window, limiting the server's decompressor memory.
    client_max_window_bits: int = 12
    #: Start every message with an empty window (less memory held between messages, worse ratio).
    server_no_context_takeover: bool = False


@attrs.frozen
class DeflateParameters:
    """What was agreed for one connection."""

    server_max_window_bits: int
    client_max_window_bits: int
    server_no_context_takeover: bool
    client_no_context_takeover: bool
    #: The ``Sec-WebSocket-Extensions`` response value.
    response: str


def _split_quoted(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_extensions(values: Iterable[str]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Parse ``Sec-WebSocket-Extensions`` header values into ``(name, [(param, value), ...])`` offers."""
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    for value in values:
        for offer in _split_quoted(value, ","):
            pieces = [piece.strip() for piece in _split_quoted(offer, ";")]
            if not pieces[0]:
                continue
            params: list[tuple[str, str | None]] = []
            for piece in pieces[1:]:
                name, equals, raw = piece.partition("=")
                raw = raw.strip()
                if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                    raw = raw[1:-1]
                params.append((name.strip().lower(), raw if equals else None))
            offers.append((pieces[0].lower(), params))
    return offers


def _bits(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def negotiate(offers: Iterable[str], options: DeflateOptions) -> DeflateParameters | None:
    """Accept the first acceptable permessage-deflate offer; ``None`` when there is none.

    An offer with an unknown or repeated parameter, or a window size out of
    range, is declined (RFC 7692 section 5.1), and the next one is tried.
    """
    for name, params in parse_extensions(offers):
        if name != "permessage-deflate":
            continue
        seen: set[str] = set()
        valid = True
        server_bits: int | None = None
        client_bits_offered = False
        client_bits_limit = 15
        server_nct = options.server_no_context_takeover
        client_nct = False
        for key, value in params:
            if key in seen:
                valid = False
                break
            seen.add(key)
            if key == "server_no_context_takeover" and value is None:
                server_nct = True
            elif key == "client_no_context_takeover" and value is None:
                client_nct = True
            elif key == "server_max_window_bits":
                server_bits = _bits(value)
                if server_bits is None:
                    valid = False
            elif key == "client_max_window_bits":
                client_bits_offered = True
                if value is not None:
                    limit = _bits(value)
                    if limit is None:
                        valid = False
                    else:
                        client_bits_limit = limit
            else:
                valid = False
        if not valid:
            continue
        # wsproto's (and zlib's raw) windows go down to 9; a client asking the server for 8 is declined.
        our_bits = options.server_max_window_bits
        if server_bits is not None:
            if server_bits < 9:
                continue
            our_bits = min(our_bits, server_bits)
        response = ["permessage-deflate"]
        if server_nct:
            response.append("server_no_context_takeover")
        if client_nct:
            response.append("client_no_context_takeover")
        if server_bits is not None:
            response.append(f"server_max_window_bits={our_bits}")
        client_bits = 15  # the client's window when it did not offer to limit it
        if client_bits_offered:
            # Never above what the client offered (RFC 7692 7.1.2.2), even when that is 8.
            client_bits = min(client_bits_limit, options.client_max_window_bits)
            response.append(f"client_max_window_bits={client_bits}")
        return DeflateParameters(
            server_max_window_bits=our_bits,
            client_max_window_bits=client_bits,
            server_no_context_takeover=server_nct,
            client_no_context_takeover=client_nct,
            response="; ".join(response),
        )
    return None


class BoundedDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, inflating at most ``max_message_size`` bytes per message."""

    def __init__(self, parameters: DeflateParameters, options: DeflateOptions, max_message_size: int) -> None:
        super().__init__(
            client_no_context_takeover=parameters.client_no_context_takeover,
            # The inflating window: 9 bits read an 8-bit client's frames too (wsproto takes 9 to 15).
            client_max_window_bits=max(9, parameters.client_max_window_bits),
            server_no_context_takeover=parameters.server_no_context_takeover,
            server_max_window_bits=parameters.server_max_window_bits,
        )
        self._enabled = True
        self._options = options
        self._limit = max_message_size
        self._inflated = 0
        self._control = False  # the frame being read is a control frame

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        """A control frame between a message's fragments leaves the message's compression state alone."""
        if opcode.iscontrol():
            self._control = True
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else RsvBits(True, False, False)
        self._control = False
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        """Inflate a piece of a compressed frame, refusing to produce more than the limit."""
        if self._control or not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None
        try:
            out = decompressor.decompress(data, self._limit - self._inflated + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self._limit or decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        """At the end of a compressed message, inflate the flush marker (bounded too) and reset the count."""
        if not fin or self._control:
            return None
        if not self._inbound_is_compressible or not self._inbound_compressed:
            self._inbound_compressed = None
            self._inflated = 0
            return None
        tail = self._inflate(b"\x00\x00\xff\xff")
        self._inflated = 0
        if isinstance(tail, CloseReason):
            return tail
        if self.client_no_context_takeover:
            self._decompressor = None  # the client starts every message with an empty window
        self._inbound_compressed = None
        return tail

    def frame_outbound(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        """Compress with the server's window and memory level."""
        if self._compressor is None and opcode in (Opcode.TEXT, Opcode.BINARY):
            self._compressor = zlib.compressobj(
                self._options.compression_level,
                zlib.DEFLATED,
                -self.server_max_window_bits,
                self._options.memory_level,
            )
        return super().frame_outbound(proto, opcode, rsv, data, fin)
