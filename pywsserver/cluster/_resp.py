"""What Redis sends on the node's own connections, read by the node itself: RESP parsed where it lies.

redis-py connects, authenticates, selects the database and subscribes; then `take_over` puts a
`RespReader` in place of redis-py's stream reader on that connection, so that each value Redis sends
(a pub/sub message, the reply to a publish) is handed to the node from the event loop's read
callback: no task is woken and no message dict is made per message. Both RESP2 and RESP3 (redis-py's
``HELLO 3``) are understood.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["RespError", "RespReader", "parse", "take_over"]

#: The start of a pub/sub message as Redis sends it under RESP3 (a push) and RESP2 (an array).
_MESSAGE_PUSH = b">3\r\n$7\r\nmessage\r\n"
_MESSAGE_ARRAY = b"*3\r\n$7\r\nmessage\r\n"
_HEAD = len(_MESSAGE_PUSH)


class RespError(bytes):
    """An error reply from Redis (its text, e.g. ``b"ERR ..."``)."""


class RespProtocolError(ValueError):
    """Redis sent something that is not RESP."""


def parse(data: bytes, position: int) -> tuple[Any, int] | None:
    """The value that starts at ``position`` and the position after it; ``None`` if it is not all there.

    Bulk and simple strings are bytes, integers int, arrays (pushes, sets) lists, maps lists of
    their keys and values, errors `RespError`, nulls ``None``; doubles, booleans and big numbers
    stay as their text (the node needs none of them).
    """
    line_end = data.find(b"\r\n", position)
    if line_end < 0:
        return None
    kind = data[position]
    after = line_end + 2
    if kind == 0x24 or kind == 0x3D or kind == 0x21:  # $ bulk string, = verbatim string, ! bulk error
        length = int(data[position + 1 : line_end])
        if length < 0:
            return None, after
        end = after + length
        if end + 2 > len(data):
            return None
        value = data[after:end]
        return (RespError(value) if kind == 0x21 else value), end + 2
    if kind == 0x3A:  # : integer
        return int(data[position + 1 : line_end]), after
    if kind == 0x2A or kind == 0x3E or kind == 0x7E or kind == 0x25 or kind == 0x7C:  # * > ~ % |
        count = int(data[position + 1 : line_end])
        if count < 0:
            return None, after
        if kind == 0x25 or kind == 0x7C:  # a map or an attribute: keys and values
            count *= 2
        items: list[Any] = []
        position = after
        for _ in range(count):
            parsed = parse(data, position)
            if parsed is None:
                return None
            item, position = parsed
            items.append(item)
        if kind == 0x7C:  # an attribute annotates the value that follows it: that value is the one
            return parse(data, position)
        return items, position
    if kind == 0x2B:  # + simple string
        return data[position + 1 : line_end], after
    if kind == 0x2D:  # - error
        return RespError(data[position + 1 : line_end]), after
    if kind == 0x5F:  # _ null
        return None, after
    if kind == 0x2C or kind == 0x23 or kind == 0x28:  # , double, # boolean, ( big number
        return data[position + 1 : line_end], after
    raise RespProtocolError(f"not RESP: {data[position : position + 32]!r}")


class RespReader(asyncio.Protocol):
    """Reads one connection to Redis: each value to ``on_value``, each pub/sub message to ``on_message``.

    ``on_lost`` is called once when the connection is gone (closed by Redis, reset, or unreadable),
    with the reason, and the exception when what came was not RESP or handing it over raised.
    """

    def __init__(
        self,
        on_lost: Callable[[str, Exception | None], None],
        on_value: Callable[[Any], None] | None = None,
        on_message: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        self._on_lost: Callable[[str, Exception | None], None] | None = on_lost
        self._on_value = on_value
        self._on_message = on_message
        self._rest = b""
        #: Reads that came after ``_rest`` while the value it begins is still incomplete, their
        #: total size with ``_rest``'s, and that value's whole size when known (0 if not): a large
        #: message arriving in many reads is joined once, when all of it is there, not copied and
        #: parsed again on every read (16 MiB in 64 KiB reads: 3.3 s of loop time before, 0.09 s).
        self._more: list[bytes] = []
        self._have = 0
        self._need = 0
        self._transport: asyncio.Transport | None = None
        #: redis-py's protocol this reader replaced: told when the connection is lost, so that closing
        #: the connection through redis-py completes.
        self.replaced: asyncio.BaseProtocol | None = None

    def stop(self) -> None:
        """Hand nothing more to the node (the link is being taken down)."""
        self._on_value = self._on_message = None
        self._on_lost = None

    def data_received(self, data: bytes) -> None:
        if self._rest:
            self._more.append(data)
            self._have += len(data)
            if self._have < self._need:
                return  # the value that began in `_rest` is not all there yet
            data = b"".join([self._rest, *self._more])
            self._rest = b""
            self._more.clear()
        self._need = 0
        try:
            position = self._read(data)
        except Exception as error:  # not RESP (a ValueError), or a bug in what the node does with it
            if self._transport is not None:
                self._transport.abort()
            self._lose(f"unreadable data from Redis: {error!r}", error)
            return
        if position < len(data):
            self._rest = data[position:]
            self._have = len(self._rest)

    def _read(self, data: bytes) -> int:
        """Hand over every whole value in ``data``: the position after the last one."""
        end = len(data)
        position = 0
        on_message = self._on_message
        while position < end:
            # The common case, a pub/sub message, read in place: two bulk strings after a fixed head.
            if on_message is not None and (
                data.startswith(_MESSAGE_PUSH, position) or data.startswith(_MESSAGE_ARRAY, position)
            ):
                start = position + _HEAD
                channel_end = data.find(b"\r\n", start)
                if channel_end < 0:
                    break
                channel_start = channel_end + 2
                channel_stop = channel_start + int(data[start + 1 : channel_end])
                data_end = data.find(b"\r\n", channel_stop + 2)
                if data_end < 0:
                    break
                data_start = data_end + 2
                data_stop = data_start + int(data[channel_stop + 3 : data_end])
                if data_stop + 2 > end:
                    self._need = data_stop + 2 - position  # the whole message, from where it starts
                    break
                position = data_stop + 2
                on_message(data[channel_start:channel_stop], data[data_start:data_stop])
                on_message = self._on_message  # stop() may have been called meanwhile
                continue
            parsed = parse(data, position)
            if parsed is None:
                break
            value, position = parsed
            if self._on_value is not None:
                self._on_value(value)
        return position

    def eof_received(self) -> bool:
        self._lose("Redis closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"the connection to Redis was lost ({exc or 'closed'})")
        if self.replaced is not None:
            self.replaced.connection_lost(exc)

    def _lose(self, reason: str, error: Exception | None = None) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(reason, error)


def take_over(connection: Any, reader: RespReader) -> asyncio.Transport:
    """Read redis-py's connected ``connection`` with ``reader`` from now on; its transport, to write to."""
    stream = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if not isinstance(stream, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        raise RuntimeError(
            "cluster: this redis-py keeps no asyncio streams on its connections (_reader, _writer, as "
            "redis-py 4.2 and later do): the node cannot read them itself"
        )
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    reader.replaced = transport.get_protocol()
    reader._transport = transport
    # Bytes redis-py's stream has read and nobody parsed yet (the replies to SUBSCRIBE, say).
    buffered = getattr(stream, "_buffer", None)
    leftover = bytes(buffered) if buffered else b""
    if buffered:
        buffered.clear()
    transport.set_protocol(reader)
    if not transport.is_reading():  # paused by redis-py's stream when its buffer was full
        transport.resume_reading()
    if leftover:
        reader.data_received(leftover)
    return transport
