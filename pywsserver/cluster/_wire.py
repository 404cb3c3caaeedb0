"""What travels between nodes on Redis: one message per publish, encoded and decoded without I/O.

A message is a kind byte, a flags byte, then fields: each but the last
prefixed by its length (4 bytes, big-endian); the last (the payload) runs to
the end, so a broadcast's data is never copied into a length-prefixed field.

=====  =========================================  ===========================================
kind   fields                                     meaning
=====  =========================================  ===========================================
``B``  origin, group, close code, data            a broadcast to ``group`` on every node
``S``  origin, reply id, run, connection id, data  a message for one connection of the target
``C``  origin, reply id, name, message             a cast to a gen server registered by name
``A``  reply id, status                            the answer to an ``S`` or a ``C``
=====  =========================================  ===========================================

Flags: ``TEXT`` (the data is UTF-8 text, sent as a text frame), ``CLOSE``
(the broadcast's ``slow`` policy is ``"close"``), ``JSON`` (a cast's message is
JSON). Anything malformed raises `WireError`; the receiver logs it and drops it.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

__all__ = ["Status", "WireError", "decode", "decode_broadcast", "encode", "pack", "unpack_payload"]

TEXT = 1
CLOSE = 2
JSON = 4

_LENGTH = struct.Struct("!I")


class WireError(ValueError):
    """A message from the cluster channel is malformed."""


class Status(enum.IntEnum):
    """The answer of a target node to a send or a cast."""

    #: Queued for the connection (or cast to the gen server).
    OK = 0
    #: No such connection on that node any more (or a node restarted since the address was made).
    GONE = 1
    #: The connection's mailbox (or the gen server's) is full.
    FULL = 2
    #: No process is registered under that name on that node.
    NO_NAME = 3


def encode(kind: bytes, flags: int, fields: list[bytes], payload: bytes) -> bytes:
    """One message: the kind, the flags, the length-prefixed fields, then the payload as is."""
    parts = [kind, bytes((flags,))]
    for field in fields:
        parts.append(_LENGTH.pack(len(field)))
        parts.append(field)
    parts.append(payload)
    return b"".join(parts)


def decode(message: bytes, count: int) -> tuple[bytes, int, list[bytes], bytes]:
    """The kind, the flags, ``count`` fields and the payload of ``message``."""
    if len(message) < 2:
        raise WireError(f"a message of {len(message)} bytes")
    kind, flags = message[:1], message[1]
    fields: list[bytes] = []
    position = 2
    view = memoryview(message)
    for _ in range(count):
        if position + 4 > len(message):
            raise WireError(f"a {kind!r} message cut short")
        (length,) = _LENGTH.unpack_from(message, position)
        position += 4
        if position + length > len(message):
            raise WireError(f"a {kind!r} message with a field longer than the message")
        fields.append(bytes(view[position : position + length]))
        position += length
    return kind, flags, fields, message[position:]


def decode_broadcast(message: bytes) -> tuple[int, bytes, int, bytes]:
    """A broadcast's flags, group, close code and data, read where they lie (its origin skipped)."""
    try:
        position = 2
        (length,) = _LENGTH.unpack_from(message, position)  # the origin
        position += 4 + length
        (length,) = _LENGTH.unpack_from(message, position)
        group = message[position + 4 : position + 4 + length]
        position += 4 + length
        (length,) = _LENGTH.unpack_from(message, position)
        code = int(message[position + 4 : position + 4 + length])
        position += 4 + length
    except (struct.error, ValueError) as error:
        raise WireError(f"a broadcast cut short or malformed: {error}") from None
    if position > len(message):
        raise WireError("a broadcast with a field longer than the message")
    return message[1], group, code, message[position:]


def pack(data: Any) -> tuple[int, bytes]:
    """``str`` (TEXT), ``bytes``, or a JSON value (JSON) as flags and bytes."""
    if isinstance(data, str):
        return TEXT, data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return 0, bytes(data)
    try:
        return JSON, json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"a message across nodes must be str, bytes or JSON-serializable: {error}") from None


def unpack_payload(flags: int, payload: bytes) -> Any:
    """The value `pack` packed."""
    try:
        if flags & JSON:
            return json.loads(payload)
        if flags & TEXT:
            return payload.decode()
    except (UnicodeDecodeError, ValueError) as error:
        raise WireError(f"a payload that does not decode: {error}") from None
    return payload
