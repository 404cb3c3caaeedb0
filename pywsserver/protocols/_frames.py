"""The common case of client frames parsed, and server frames encoded, in one call each.

`parse_frames` takes whole masked frames with FIN set, no reserved bits,
opcode text, binary, close, ping or pong, within the size limit (125 bytes for
control frames): it unmasks them and checks and decodes text as UTF-8. It
stops at the first frame it does not take, and at a close frame, and says
why; the WebSocket module judges the close frame's payload itself and hands a
frame it does not take, and what follows, to wsproto.

`steady_read` is a whole read of the connection core's steady state in one
call: the frames parsed, each message handed to the handler's ``handle``, the
commonest results (a reply, no reply) answered with frames, and where it had
to stop, and why, told to the core, which goes on from there on its general
path (``ConnectionCore._steady_read``). `steady_step` is that read with what the core does
around it: the idle timer, the counters, the state stored and the replies written to the socket.

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
    "STEADY_DONE",
    "STEADY_FATAL",
    "STEADY_PARSED",
    "STEADY_RAISED",
    "STEADY_RESULT",
    "encode_frame",
    "encode_frame_python",
    "parse_frames",
    "parse_frames_python",
    "steady_read",
    "steady_read_python",
    "steady_step",
    "steady_step_python",
]

#: Why `parse_frames` stopped: at the end of the complete frames (what is left is kept for more bytes),
INCOMPLETE = 0
#: at a frame it does not take (``position`` is its start),
OTHER = 1
#: at a close frame (its last item; ``position`` is its start; the caller judges its payload),
CLOSE = 2
#: at a text frame that is not UTF-8 (``detail`` is the decoder's message; ``position`` is after it).
BAD_UTF8 = 3

#: How `steady_read`'s answer begins: every message was answered, ``(DONE, state, count, replies)``;
STEADY_DONE = 0
#: the read is not whole text and binary frames only, no handler called: ``(PARSED, parsed)``;
STEADY_PARSED = 1
#: a result it does not answer: ``(RESULT, state, count, replies, items, result)``;
STEADY_RESULT = 2
#: ``handle`` raised an Exception: ``(RAISED, state, count, replies, items, exception)``;
STEADY_RAISED = 3
#: ``handle`` raised another BaseException, to be raised again: ``(FATAL, ..., items, exception)``.
STEADY_FATAL = 4

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


def steady_read_python(
    buffer: bytes | bytearray | memoryview,
    nbytes: int,
    limit: int,
    handler: Any,
    state: Any,
    out: list[bytes],
    core: Any,
) -> tuple[Any, ...]:
    """A read of the core's steady state: the first ``nbytes`` of ``buffer`` parsed and handled.

    Unless they are whole text and binary frames only, no handler is called: ``(STEADY_PARSED,
    parsed)`` (what `parse_frames` gives). Else each message goes to ``handler.handle(message,
    state)`` in turn; ``("reply", str or bytes, state)`` has its frame appended to ``out``,
    ``("noreply", state)`` nothing, and the next call gets the new state, as long as
    ``core._steady_ok`` is still true after the call: ``(STEADY_DONE, state, count, replies,
    output)``, ``output`` being what ``out`` held as one bytes object (``None`` if nothing), ``out``
    emptied. Anything else stops it, the
    message given to the last call being ``items[count - 1]`` and ``state`` the one it got:
    ``(STEADY_RESULT, state, count, replies, items, result)`` for another result (another shape, a
    tuple subclass, text that cannot be encoded, the flag gone false), ``(STEADY_RAISED, ...,
    items, exception)`` when ``handle`` raised an Exception, ``(STEADY_FATAL, ..., items,
    exception)`` for any other exception.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if not 0 <= nbytes <= len(buffer):
        raise ValueError("nbytes must be within the buffer")
    parsed = parse_frames_python(bytes(buffer[:nbytes]), limit)
    items, position, stop, _ = parsed
    if stop != INCOMPLETE or position != nbytes or any(type(item) is tuple for item in items):
        return STEADY_PARSED, parsed
    count = replies = 0
    for message in items:
        count += 1
        try:
            raw = handler.handle(message, state)
        except Exception as error:
            return STEADY_RAISED, state, count, replies, items, error
        except BaseException as error:
            return STEADY_FATAL, state, count, replies, items, error
        if type(raw) is tuple and getattr(core, "_steady_ok", False) is True:
            if len(raw) == 3 and _is_literal(raw[0], "reply") and type(raw[1]) in (str, bytes):
                try:
                    frame = encode_frame_python(raw[1])
                except UnicodeEncodeError:  # a lone surrogate: the general path meets it where it would
                    return STEADY_RESULT, state, count, replies, items, raw
                out.append(frame)
                replies += 1
                state = raw[2]
                continue
            if len(raw) == 2 and _is_literal(raw[0], "noreply"):
                state = raw[1]
                continue
        return STEADY_RESULT, state, count, replies, items, raw
    output = b"".join(out) if out else None
    out.clear()
    return STEADY_DONE, state, count, replies, output


def steady_step_python(
    core: Any, buffer: bytes | bytearray | memoryview, nbytes: int, transport: Any, fd: int
) -> Any:
    """A whole read of the core's steady state: `steady_read_python` and what the core does around it.

    The idle timer restarts first (``core._set_timer("idle", core._steady_idle)`` unless that is
    ``None``) and the bytes are counted; then `steady_read_python` with the core's limit, handler,
    state and output list. When it answered every message (``STEADY_DONE``) the step carries that
    out: the state stored in ``core._handler_state``, the messages counted in
    ``core._messages_in``, the replies in the module's ``messages_out``, and unless the socket is
    closed the output counted in ``core._bytes_out`` and written, then ``None`` is returned. The
    write: when ``transport`` (the core's writer if it is asyncio's selector socket transport, else
    ``None``) buffers nothing and is not closing, one ``send`` on its socket, the rest after a short
    send to its ``write`` (as the transport's own ``write`` does), and on an error of the send the
    whole to its ``write`` (which meets the error again and closes the transport); otherwise
    ``core._writer.write``. Any other answer of `steady_read_python` is returned as it is, for
    the core's ``_steady_answer``, with only the timer and the bytes in done. ``fd`` is the
    transport's socket's descriptor (the C step sends on it; here ``transport._sock.send``).
    """
    idle = core._steady_idle
    if idle is not None:
        core._set_timer("idle", idle)  # as the module's data_received would first
    core._bytes_in += nbytes
    handler, state = core._handler_object, core._handler_state
    answer = steady_read_python(buffer, nbytes, core._steady_limit, handler, state, core._out, core)
    if answer[0] != STEADY_DONE:
        return answer
    core._handler_state = answer[1]
    if answer[2]:
        core._messages_in += answer[2]
    if answer[3]:
        core._module.messages_out += answer[3]
    reply = answer[4]
    if reply is None or core._socket_closed:
        return None
    core._bytes_out += len(reply)
    if transport is None or transport._buffer or transport._conn_lost:
        core._writer.write(reply)
        return None
    try:
        sent = transport._sock.send(reply)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except Exception:
        transport.write(reply)  # fails the same way, and closes the transport as its own write would
        return None
    if sent < len(reply):
        transport.write(reply[sent:])
    return None


def _is_literal(value: object, literal: str) -> bool:
    return type(value) is str and value == literal


parse_frames: Callable[[bytes | bytearray | memoryview, int], Parsed]
encode_frame: Callable[[str | bytes], bytes]
steady_read: Callable[[bytes | bytearray | memoryview, int, int, Any, Any, list[bytes], Any], tuple[Any, ...]]
steady_step: Callable[[Any, bytes | bytearray | memoryview, int, Any, int], Any]
try:
    from .._speedups import encode_frame, parse_frames, steady_read, steady_step

    #: Whether the C speedups are in use.
    SPEEDUPS = True
except ImportError:  # pragma: no cover - depends on the installation
    parse_frames = parse_frames_python
    encode_frame = encode_frame_python
    steady_read = steady_read_python
    steady_step = steady_step_python
    SPEEDUPS = False
