"""The common case of client frames parsed, and server frames encoded, in one call each.

`parse_frames` takes whole masked frames with FIN set, no reserved bits,
opcode text, binary, close, ping or pong, within the size limit (125 bytes for
control frames): it unmasks them and checks and decodes text as UTF-8. It
stops at the first frame it does not take, and at a close frame, and says
why; the WebSocket module judges the close frame's payload itself and hands a
frame it does not take, and what follows, to wsproto.

The C speedup (``pywsserver._speedups``, built at install when a compiler is
there) does it with no Python call per frame; without it, the pure-Python
functions below are used. Both give the same answers for any bytes
(``tests/test_frames.py`` checks it with hypothesis, split at every byte).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._mask import unmask

__all__ = [
    "BAD_UTF8",
    "CLOSE",
    "INCOMPLETE",
    "OTHER",
    "SPEEDUPS",
    "encode_frame",
    "encode_frame_python",
    "parse_frames",
    "parse_frames_python",
]

#: Why `parse_frames` stopped: at the end of the complete frames (what is left is kept for more bytes),
INCOMPLETE = 0
#: at a frame it does not take (``position`` is its start),
OTHER = 1
#: at a close frame (its last item; ``position`` is its start; the caller judges its payload),
CLOSE = 2
#: at a text frame that is not UTF-8 (``detail`` is the decoder's message; ``position`` is after it).
BAD_UTF8 = 3

#: What `parse_frames` returns: (items, position, stop, detail).
Parsed = tuple[list[Any], int, int, str | None]

_OPCODES = (1, 2, 8, 9, 10)


def parse_frames_python(data: bytes | bytearray | memoryview, limit: int) -> Parsed:
    """Parse the common case of client frames from ``data``; see the module docstring.

    Items, in order: ``str`` (a text message), ``bytes`` (binary), ``(9, payload)`` a ping,
    ``(10, payload)`` a pong, ``(8, payload)`` a close frame (always the last item).
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    items: list[Any] = []
    size, position = len(data), 0
    while size - position >= 2:
        first, second = data[position], data[position + 1]
        opcode = first & 0x0F
        if first & 0x70 or not first & 0x80 or not second & 0x80 or opcode not in _OPCODES:
            return items, position, OTHER, None  # reserved bits, a fragment, unmasked, a reserved opcode
        length, header = second & 0x7F, 2
        if length == 126:
            if size - position < 4:
                break
            length, header = int.from_bytes(data[position + 2 : position + 4], "big"), 4
        elif length == 127:
            if size - position < 10:
                break
            length, header = int.from_bytes(data[position + 2 : position + 10], "big"), 10
        if length > limit or (opcode > 2 and length > 125):
            return items, position, OTHER, None
        end = position + header + 4 + length
        if end > size:
            break  # not complete yet
        payload = unmask(data[position + header + 4 : end], data[position + header : position + header + 4])
        if opcode == 1:
            try:
                items.append(payload.decode("utf-8"))
            except UnicodeDecodeError as error:
                return items, end, BAD_UTF8, str(error)
        elif opcode == 2:
            items.append(payload)
        elif opcode == 8:
            items.append((8, payload))
            return items, position, CLOSE, None
        else:
            items.append((opcode, payload))
        position = end
    return items, position, INCOMPLETE, None


def encode_frame_python(data: str | bytes) -> bytes:
    """One unfragmented, unmasked (server-to-client) frame: text for ``str``, binary for bytes."""
    if isinstance(data, str):
        first, payload = 0x81, data.encode("utf-8")
    else:
        first, payload = 0x82, bytes(data)
    size = len(payload)
    if size < 126:
        header = bytes((first, size))
    elif size < 65536:
        header = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + size.to_bytes(8, "big")
    return header + payload


parse_frames: Callable[[bytes | bytearray | memoryview, int], Parsed]
encode_frame: Callable[[str | bytes], bytes]
try:
    from .._speedups import encode_frame, parse_frames

    #: Whether the C speedups are in use.
    SPEEDUPS = True
except ImportError:  # pragma: no cover - depends on the installation
    parse_frames = parse_frames_python
    encode_frame = encode_frame_python
    SPEEDUPS = False
