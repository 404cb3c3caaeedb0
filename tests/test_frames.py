"""The frame parser and encoder: the C speedup and the pure-Python fallback give the same answers.

Random client frame streams (valid frames and every kind the parser must refuse), parsed whole and
cut at every byte; random bytes (the C parser fuzzed: no crash, the same answer); and both checked
against frames built by the RFC's rules here, independently of either.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywsserver.protocols import _frames, _websocket
from pywsserver.protocols._frames import (
    BAD_UTF8,
    CLOSE,
    INCOMPLETE,
    OTHER,
    encode_frame_python,
    parse_frames_python,
)

from .test_websocket_fastpath import client_frames, encode, run

needs_c = pytest.mark.skipif(not _frames.SPEEDUPS, reason="the C speedup was not built (no compiler at install)")


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
    length_form: int = 0,
) -> bytes:
    """A client frame by RFC 6455 section 5.2; ``length_form`` 126 or 127 forces a longer length field."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    masked_bit = 0x80 if mask is not None else 0
    if size < 126 and length_form == 0:
        header = bytes((first, masked_bit | size))
    elif size < 65536 and length_form != 127:
        header = bytes((first, masked_bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, masked_bit | 127)) + size.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + bytes(octet ^ mask[i % 4] for i, octet in enumerate(payload))


masks = st.binary(min_size=4, max_size=4)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.builds(
        lambda code, reason: code.to_bytes(2, "big") + reason,
        st.one_of(
            st.sampled_from([999, 1000, 1003, 1004, 1005, 1006, 1007, 1013, 1014, 2999, 3000, 4999, 5000]),
            st.integers(0, 65535),
        ),
        st.one_of(st.text(max_size=30).map(lambda t: t.encode("utf-8")[:123]), st.binary(max_size=10)),
    ),
)
any_frame = st.one_of(
    st.builds(lambda t, m: frame(1, t.encode("utf-8"), mask=m), st.text(max_size=300), masks),
    st.builds(lambda b, m: frame(2, b, mask=m), st.binary(max_size=300), masks),
    st.builds(lambda b, m: frame(1, b, mask=m), st.binary(max_size=20), masks),  # mostly not UTF-8
    st.builds(lambda b, m: frame(9, b, mask=m), st.binary(max_size=130), masks),  # > 125: refused
    st.builds(lambda b, m: frame(10, b, mask=m), st.binary(max_size=125), masks),
    st.builds(lambda p, m: frame(8, p, mask=m), close_payloads, masks),
    st.builds(lambda b, f: frame(2, b, length_form=f), st.binary(max_size=200), st.sampled_from([126, 127])),
    st.builds(lambda b: frame(1, b, fin=False), st.binary(max_size=10)),  # a fragment
    st.builds(lambda b: frame(0, b), st.binary(max_size=10)),  # a continuation
    st.builds(lambda b, r: frame(2, b, rsv=r), st.binary(max_size=10), st.integers(1, 7)),
    st.builds(lambda b, o: frame(o, b), st.binary(max_size=10), st.sampled_from([3, 4, 5, 6, 7, 11, 12, 15])),
    st.builds(lambda b: frame(2, b, mask=None), st.binary(max_size=10)),  # unmasked
    st.just(frame(2, b"", length_form=127)[:2] + (2**63).to_bytes(8, "big") + b"\x00" * 4),  # absurd length
)
streams = st.lists(any_frame, max_size=10).map(b"".join)
limits = st.one_of(st.just(1 << 20), st.integers(0, 400))


@needs_c
@settings(max_examples=300)
@given(streams, limits)
def test_c_and_python_agree_on_any_frame_stream_cut_at_every_byte(data: bytes, limit: int) -> None:
    for end in range(len(data) + 1):
        prefix = data[:end]
        assert _frames.parse_frames(prefix, limit) == parse_frames_python(prefix, limit), end
    assert _frames.parse_frames(bytearray(data), limit) == parse_frames_python(bytearray(data), limit)


@needs_c
@settings(max_examples=1000)
@given(st.binary(max_size=400), limits)
def test_the_c_parser_fuzzed_with_random_bytes_answers_as_python(data: bytes, limit: int) -> None:
    assert _frames.parse_frames(data, limit) == parse_frames_python(data, limit)


@needs_c
@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from([0x81, 0x82, 0x88, 0x89, 0x8A]), st.integers(0, 255)), max_size=40))
def test_the_c_parser_on_headers_with_nothing_behind_them(headers: list[tuple[int, int]]) -> None:
    # Header bytes only (lengths that announce more than there is): incomplete, never a read past the end.
    data = b"".join(bytes(pair) for pair in headers)
    for end in range(len(data) + 1):
        assert _frames.parse_frames(data[:end], 1 << 20) == parse_frames_python(data[:end], 1 << 20)


@needs_c
def test_c_and_python_agree_on_every_first_two_bytes() -> None:
    # Every FIN/RSV/opcode byte with every MASK/length byte, followed by enough bytes for any header.
    tail = bytes(range(40, 140))
    for first in range(256):
        for second in range(256):
            data = bytes((first, second, 0, 0, 0, 0, 0, 0, 0, 30)) + tail
            for limit in (20, 1 << 20):
                assert _frames.parse_frames(data, limit) == parse_frames_python(data, limit), (first, second, limit)


@needs_c
def test_c_and_python_agree_on_every_close_status_code() -> None:
    for code in range(0, 65536, 7):
        for reason in (b"", b"ok", b"\xff"):
            data = frame(2, b"x") + frame(8, code.to_bytes(2, "big") + reason) + frame(1, b"after")
            assert _frames.parse_frames(data, 125) == parse_frames_python(data, 125), (code, reason)


@needs_c
def test_c_and_python_agree_at_the_size_limit() -> None:
    for opcode in (1, 2, 8, 9, 10):
        for size in (*range(0, 260), 65535, 65536, 65537):
            payload = b"\x03\xe8" + b"a" * (size - 2) if opcode == 8 and size >= 2 else b"a" * size
            for form in (0, 126, 127):
                data = frame(opcode, payload, length_form=form)
                for limit in (size - 1, size, size + 1):
                    if limit >= 0:
                        assert _frames.parse_frames(data, limit) == parse_frames_python(data, limit), (
                            opcode,
                            size,
                            form,
                            limit,
                        )


def parse_all(parse: Any, chunks: list[bytes], limit: int) -> list[Any]:
    """Feed ``chunks`` as the WebSocket module does (keeping an incomplete frame): every answer in order."""
    answers: list[Any] = []
    carry = b""
    for chunk in chunks:
        carry += chunk
        items, position, stop, detail = parse(carry, limit)
        answers += items
        if stop != INCOMPLETE:
            answers.append((stop, detail))
            return answers
        carry = carry[position:]
    return answers


@needs_c
@settings(max_examples=200)
@given(streams, st.lists(st.integers(1, 50), max_size=20), limits)
def test_c_and_python_agree_when_fed_in_any_pieces(data: bytes, cuts: list[int], limit: int) -> None:
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(data[position : position + cut])
        position += cut
    chunks.append(data[position:])
    assert parse_all(_frames.parse_frames, chunks, limit) == parse_all(parse_frames_python, chunks, limit)


@pytest.mark.parametrize("parse", [parse_frames_python, _frames.parse_frames], ids=["python", "default"])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=200),
            st.binary(max_size=70000).filter(lambda b: len(b) < 200 or len(b) > 65535),
            st.tuples(st.sampled_from([9, 10]), st.binary(max_size=125)),
        ),
        max_size=5,
    ),
    masks,
)
@settings(max_examples=50)
def test_valid_frames_give_their_messages_in_order(parse: Any, messages: list[Any], mask: bytes) -> None:
    data = b""
    for message in messages:
        if isinstance(message, str):
            data += frame(1, message.encode("utf-8"), mask=mask)
        elif isinstance(message, bytes):
            data += frame(2, message, mask=mask)
        else:
            data += frame(message[0], message[1], mask=mask)
    assert parse(data, 1 << 20) == (messages, len(data), INCOMPLETE, None)


@pytest.mark.parametrize("parse", [parse_frames_python, _frames.parse_frames], ids=["python", "default"])
def test_each_way_of_stopping(parse: Any) -> None:
    hello = frame(1, b"hello")
    assert parse(hello + hello[:3], 100) == (["hello"], len(hello), INCOMPLETE, None)
    assert parse(hello + frame(1, b"x", fin=False), 100) == (["hello"], len(hello), OTHER, None)
    assert parse(frame(2, b"x" * 101), 100) == ([], 0, OTHER, None)  # over the limit
    assert parse(frame(9, b"x" * 126), 1000) == ([], 0, OTHER, None)  # a control frame over 125 bytes
    close = frame(8, b"\x03\xe8bye")  # the close frame's payload is the caller's to judge
    assert parse(hello + close + hello, 100) == (["hello", (8, b"\x03\xe8bye")], len(hello), CLOSE, None)
    assert parse(frame(8, b"\x03\xed\xff"), 100) == ([(8, b"\x03\xed\xff")], 0, CLOSE, None)
    assert parse(frame(8, b""), 100) == ([(8, b"")], 0, CLOSE, None)
    bad = frame(1, b"ok\xff")
    items, position, stop, detail = parse(hello + bad + hello, 100)
    assert (items, position, stop) == (["hello"], len(hello) + len(bad), BAD_UTF8)
    with pytest.raises(UnicodeDecodeError) as error:
        b"ok\xff".decode()
    assert detail == str(error.value)


def by_the_rfc(data: str | bytes) -> bytes:
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return frame(1 if isinstance(data, str) else 2, payload, mask=None)


@pytest.mark.parametrize("encode", [encode_frame_python, _frames.encode_frame], ids=["python", "default"])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), st.sampled_from(["é" * 40000, b"x" * 70000])))
@settings(max_examples=100)
def test_server_frames_are_encoded_by_the_rfc(encode: Any, data: str | bytes) -> None:
    assert encode(data) == by_the_rfc(data)


@needs_c
def test_the_c_encoder_takes_any_bytes_like_and_refuses_lone_surrogates_as_python_does() -> None:
    assert _frames.encode_frame(bytearray(b"ab")) == _frames.encode_frame(memoryview(b"ab")) == b"\x82\x02ab"
    with pytest.raises(UnicodeEncodeError) as c_error:
        _frames.encode_frame("\ud800")
    with pytest.raises(UnicodeEncodeError) as python_error:
        encode_frame_python("\ud800")
    assert str(c_error.value) == str(python_error.value)
    with pytest.raises(TypeError):
        _frames.encode_frame(12)  # type: ignore[arg-type]


@needs_c
def test_the_c_parser_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="negative"):
        _frames.parse_frames(b"", -1)
    with pytest.raises(TypeError):
        _frames.parse_frames("text", 10)  # type: ignore[arg-type]


@needs_c
@settings(max_examples=200, deadline=None)
@given(frames=client_frames(), cuts=st.lists(st.integers(0, 4000), max_size=8), limit=st.sampled_from([64, 1 << 20]))
def test_the_websocket_module_answers_the_same_with_and_without_the_c_parser(
    frames: list[Any], cuts: list[int], limit: int
) -> None:
    data = encode(frames)
    with_c = run(data, cuts, fast=True, limit=limit)
    saved = _websocket._parse_frames
    _websocket._parse_frames = None  # the Python loop parses every frame
    try:
        assert run(data, cuts, fast=True, limit=limit) == with_c
    finally:
        _websocket._parse_frames = saved


@needs_c
def test_the_websocket_module_uses_the_c_parser_for_a_read_of_whole_frames() -> None:
    calls: list[int] = []
    saved = _websocket._parse_frames
    assert saved is not None

    def counting(data: bytes | bytearray, limit: int) -> Any:
        calls.append(len(data))
        return saved(data, limit)

    _websocket._parse_frames = counting
    try:
        data = frame(1, b"one") + frame(2, b"two")
        assert run(data, [], fast=True, limit=100) == (["Opened", "one", b"two"], b"")
        assert calls == [len(data)]
    finally:
        _websocket._parse_frames = saved


# ------------------------------------------------------------------ steady_read

#: What the handler of `steady_read` answers, cycling through a drawn script.
SHAPES = [
    "reply-str",
    "reply-bytes",
    "noreply",
    "reply-int",  # ("reply", 5, state): not answered
    "reply-bytearray",  # not exact bytes: not answered
    "reply-surrogate",  # text that cannot be encoded: not answered
    "tuple-subclass",
    "str-subclass-tag",  # (a str subclass "reply", ...): not answered
    "list",  # ["noreply", state]
    "close",  # ("close", 1000)
    "none",
    "raise",
    "raise-base",  # a BaseException that is not an Exception
    "leave",  # the call clears the core's flag, then replies
    "long-tuple",
]


class _Tag(str):
    __slots__ = ()


class _Tuple(tuple):  # type: ignore[type-arg]
    __slots__ = ()


class _Stop(BaseException):
    pass


class _Core:
    """What `steady_read` reads of the connection core: its flag."""

    __slots__ = ("_steady_ok",)

    def __init__(self) -> None:
        self._steady_ok = True


class ShapeHandler:
    """Answers each message as the script says; records the calls."""

    def __init__(self, script: list[str], core: _Core) -> None:
        self.script = script
        self.core = core
        self.calls: list[Any] = []

    def handle(self, message: Any, state: int) -> Any:
        self.calls.append((message, state))
        what = self.script[len(self.calls) % len(self.script)] if self.script else "reply-str"
        new = state + 1
        if what == "reply-str":
            return ("reply", message if isinstance(message, str) else "é" * (state % 3), new)
        if what == "reply-bytes":
            return ("reply", b"b" * (state % 200), new)
        if what == "noreply":
            return ("noreply", new)
        if what == "reply-int":
            return ("reply", 5, new)
        if what == "reply-bytearray":
            return ("reply", bytearray(b"x"), new)
        if what == "reply-surrogate":
            return ("reply", "\ud800", new)
        if what == "tuple-subclass":
            return _Tuple(("noreply", new))
        if what == "str-subclass-tag":
            return (_Tag("reply"), "x", new)
        if what == "list":
            return ["noreply", new]
        if what == "close":
            return ("close", 1000)
        if what == "none":
            return None
        if what == "raise":
            raise ValueError(f"failed at {state}")
        if what == "raise-base":
            raise _Stop(f"stopped at {state}")
        if what == "leave":
            self.core._steady_ok = False
            return ("reply", "after", new)
        return ("reply", "x", new, "extra")


def _comparable(value: Any) -> Any:
    """Exceptions as (type, args): two runs raise equal, not identical, ones."""
    if isinstance(value, BaseException):
        return (type(value), value.args)
    if type(value) is tuple:
        return tuple(_comparable(item) for item in value)
    return (type(value), value) if isinstance(value, tuple | list) else value


def _steady(read: Any, data: bytes, nbytes: int, limit: int, script: list[str], out: list[bytes]) -> Any:
    core = _Core()
    handler = ShapeHandler(script, core)
    buffer = bytearray(data)
    answer = read(memoryview(buffer), nbytes, limit, handler, 0, out, core)
    buffer[:] = b"\xaa" * len(buffer)  # the buffer is reused: nothing may keep it
    return _comparable(answer), handler.calls, list(out), core._steady_ok


data_streams = st.one_of(
    st.lists(
        st.one_of(
            st.builds(lambda t, m: frame(1, t.encode("utf-8"), mask=m), st.text(max_size=150), masks),
            st.builds(lambda b, m: frame(2, b, mask=m), st.binary(max_size=150), masks),
            st.builds(lambda b, f: frame(2, b, length_form=f), st.binary(max_size=200), st.sampled_from([126, 127])),
        ),
        max_size=8,
    ).map(b"".join),
    streams,
)


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    data=data_streams,
    extra=st.binary(max_size=3),
    cut=st.integers(0, 4000),
    limit=limits,
    script=st.lists(st.sampled_from(SHAPES), max_size=6),
    before=st.lists(st.binary(max_size=5), max_size=2),
)
def test_steady_read_c_and_python_agree_on_any_read_and_any_result(
    data: bytes, extra: bytes, cut: int, limit: int, script: list[str], before: list[bytes]
) -> None:
    nbytes = min(cut, len(data))
    buffer = data + extra  # the driver's buffer holds more than was read
    with_c = _steady(_frames.steady_read, buffer, nbytes, limit, script, list(before))
    with_python = _steady(_frames.steady_read_python, buffer, nbytes, limit, script, list(before))
    assert with_c == with_python


@needs_c
@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300), limits, st.lists(st.sampled_from(SHAPES), max_size=4))
def test_steady_read_fuzzed_with_random_bytes_answers_as_python(data: bytes, limit: int, script: list[str]) -> None:
    assert _steady(_frames.steady_read, data, len(data), limit, script, []) == _steady(
        _frames.steady_read_python, data, len(data), limit, script, []
    )


@pytest.mark.parametrize("read", [_frames.steady_read_python, _frames.steady_read], ids=["python", "default"])
def test_steady_read_answers_whole_data_frames_and_stops_where_it_must(read: Any) -> None:
    data = frame(1, b"one") + frame(2, b"two") + frame(1, b"three")
    out: list[bytes] = [b"before"]
    answer, calls, rest, _ = _steady(read, data, len(data), 100, ["noreply", "reply-str", "reply-bytes"], out)
    # The n-th call answers as the script's entry n (modulo its length): the first one replies.
    assert calls == [("one", 0), (b"two", 1), ("three", 2)]
    assert answer == (_frames.STEADY_DONE, 3, 3, 2, b"before" + b"\x81\x03one" + b"\x82\x01b")
    assert rest == []
    # A ping in the read: nothing is called, the parse is handed back.
    data = frame(1, b"one") + frame(9, b"p")
    answer, calls, rest, _ = _steady(read, data, len(data), 100, [], [])
    assert calls == [] and answer == (_frames.STEADY_PARSED, _comparable(parse_frames_python(data, 100)))
    # A frame cut short: the same.
    answer, calls, _, _ = _steady(read, data, 5, 100, [], [])
    assert calls == [] and answer == (_frames.STEADY_PARSED, _comparable(parse_frames_python(data[:5], 100)))
    # A result it does not answer: where it stopped, the state that call got, what it returned.
    data = frame(1, b"a") + frame(1, b"b") + frame(1, b"c")
    answer, calls, rest, _ = _steady(read, data, len(data), 100, ["close", "reply-str"], [])
    assert answer[:4] == (_frames.STEADY_RESULT, 1, 2, 1)  # the first call replied, the second closed
    assert answer[4] == (list, ["a", "b", "c"]) and answer[5] == ("close", 1000)
    assert rest == [b"\x81\x01a"]
    # An exception: the same, with the exception.
    answer, *_ = _steady(read, data, len(data), 100, ["raise"], [])
    assert answer[:4] == (_frames.STEADY_RAISED, 0, 1, 0) and answer[5] == (ValueError, ("failed at 0",))
    answer, *_ = _steady(read, data, len(data), 100, ["raise-base"], [])
    assert answer[:4] == (_frames.STEADY_FATAL, 0, 1, 0) and answer[5] == (_Stop, ("stopped at 0",))
    # The flag gone during a call: that call's result goes to the general path.
    answer, calls, rest, steady = _steady(read, data, len(data), 100, ["reply-str", "leave"], [])
    assert answer[:4] == (_frames.STEADY_RESULT, 0, 1, 0) and answer[5] == ("reply", "after", 1)
    assert not steady and rest == []


@pytest.mark.parametrize("read", [_frames.steady_read_python, _frames.steady_read], ids=["python", "default"])
def test_steady_read_refuses_bad_arguments(read: Any) -> None:
    handler = ShapeHandler([], _Core())
    with pytest.raises(ValueError, match="negative"):
        read(b"", 0, -1, handler, 0, [], _Core())
    with pytest.raises(ValueError, match="within"):
        read(b"ab", 3, 10, handler, 0, [], _Core())
    with pytest.raises(TypeError):
        read("text", 0, 10, handler, 0, [], _Core())


# ------------------------------------------------------------------ steady_step


class _StepModule:
    __slots__ = ("messages_out",)

    def __init__(self) -> None:
        self.messages_out = 7


class _Writer:
    """The core's writer (and a transport's ``write``): records what it is given."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


class _StepCore:
    """What `steady_step` reads and writes of the connection core, in slots as the core keeps them."""

    __slots__ = (
        "_bytes_in",
        "_bytes_out",
        "_handler_object",
        "_handler_state",
        "_messages_in",
        "_module",
        "_out",
        "_socket_closed",
        "_steady_idle",
        "_steady_limit",
        "_steady_ok",
        "_timers_set",
        "_writer",
    )

    def __init__(self, script: list[str], limit: int, idle: float | None, closed: bool, out: list[bytes]) -> None:
        self._steady_ok = True
        self._steady_idle = idle
        self._steady_limit = limit
        self._handler_object = ShapeHandler(script, self)  # type: ignore[arg-type]
        self._handler_state = 0
        self._out = out
        self._bytes_in, self._bytes_out, self._messages_in = 1000, 2000, 3
        self._module = _StepModule()
        self._socket_closed = closed
        self._writer = _Writer()
        self._timers_set: list[tuple[str, Any]] = []

    def _set_timer(self, name: str, seconds: float | None) -> None:
        self._timers_set.append((name, seconds))

    def seen(self) -> Any:
        return (
            self._steady_ok,
            self._handler_state,
            list(self._out),
            (self._bytes_in, self._bytes_out, self._messages_in, self._module.messages_out),
            self._writer.written,
            self._timers_set,
            self._handler_object.calls,
        )


class _DictCore(_StepCore):
    """The same with an instance dict and ``__setattr__`` of its own: every attribute by name."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


class _Transport(_Writer):
    """What `steady_step` reads of asyncio's selector socket transport, over one end of a socket pair."""

    def __init__(self, sock: socket.socket, buffered: bool, lost: bool) -> None:
        super().__init__()
        self._sock = sock
        self._buffer = bytearray(b"x" if buffered else b"")
        self._conn_lost = 1 if lost else 0


def _step(step: Any, data: bytes, nbytes: int, limit: int, script: list[str], setup: dict[str, Any]) -> Any:
    kind = _DictCore if setup["by_name"] else _StepCore
    core = kind(script, limit, setup["idle"], setup["closed"], list(setup["before"]))
    buffer = bytearray(data)
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        peer.setblocking(False)
        if setup["socket"] == "full":  # a send takes nothing: the reply goes to the transport's write
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):
                    ours.send(b"f" * 4096)
        elif setup["socket"] == "broken":  # the send fails: the transport's write is handed the reply
            peer.close()
        transport = None
        if setup["transport"]:
            transport = _Transport(ours, setup["buffered"], setup["lost"])
        try:
            answer = _comparable(step(core, memoryview(buffer), nbytes, transport, ours.fileno()))
        except BaseException as error:  # the handler's own (a BaseException) is answered, not raised
            answer = ("raised", _comparable(error))
        buffer[:] = b"\xaa" * len(buffer)  # the buffer is reused: nothing may keep it
        received = b""
        if setup["socket"] == "open":
            with contextlib.suppress(BlockingIOError):
                while chunk := peer.recv(65536):
                    received += chunk
        return answer, core.seen(), received, transport.written if transport else None


step_setups = st.fixed_dictionaries(
    {
        "by_name": st.booleans(),
        "idle": st.sampled_from([None, 30.0]),
        "closed": st.booleans(),
        "before": st.lists(st.binary(max_size=5), max_size=2),
        "transport": st.booleans(),
        "buffered": st.booleans(),
        "lost": st.booleans(),
        "socket": st.sampled_from(["open", "open", "full", "broken"]),
    }
)


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    data=data_streams,
    cut=st.integers(0, 4000),
    limit=limits,
    script=st.lists(st.sampled_from(SHAPES), max_size=6),
    setup=step_setups,
)
def test_steady_step_c_and_python_agree_on_the_counters_the_state_and_the_write(
    data: bytes, cut: int, limit: int, script: list[str], setup: dict[str, Any]
) -> None:
    nbytes = min(cut, len(data))
    with_c = _step(_frames.steady_step, data + b"\x81", nbytes, limit, script, setup)
    with_python = _step(_frames.steady_step_python, data + b"\x81", nbytes, limit, script, setup)
    assert with_c == with_python


@pytest.mark.parametrize("step", [_frames.steady_step_python, _frames.steady_step], ids=["python", "default"])
def test_steady_step_writes_to_the_socket_and_counts(step: Any) -> None:
    data = frame(1, b"one") + frame(2, b"two")
    setup = {"by_name": False, "idle": 30.0, "closed": False, "before": [b"b"], "buffered": False, "lost": False}
    answer, seen, received, written = _step(
        step, data, len(data), 100, ["noreply", "reply-str"], {**setup, "transport": True, "socket": "open"}
    )
    _, state, out, counts, writer, timers, calls = seen
    assert answer is None and state == 2 and out == [] and calls == [("one", 0), (b"two", 1)]
    assert received == b"b\x81\x03one" and written == [] and writer == []  # straight to the socket
    assert counts == (1000 + len(data), 2000 + 6, 3 + 2, 7 + 1) and timers == [("idle", 30.0)]
    # The socket takes nothing: the transport's write has it all, counted once.
    answer, seen, _, written = _step(
        step, data, len(data), 100, ["noreply", "reply-str"], {**setup, "transport": True, "socket": "full"}
    )
    assert answer is None and written == [b"b\x81\x03one"] and seen[3][1] == 2006
    # The transport buffers already: its write, through the core's writer (the same object in a server).
    answer, seen, _, written = _step(
        step, data, len(data), 100, ["reply-str"], {**setup, "buffered": True, "transport": True, "socket": "open"}
    )
    assert answer is None and written == [] and seen[4] == [b"b\x81\x03one\x81\x02\xc3\xa9"]
    # The transport has lost its connection: the core's writer (as when it buffers), never the socket.
    answer, seen, received, written = _step(
        step, data, len(data), 100, ["reply-str"], {**setup, "lost": True, "transport": True, "socket": "open"}
    )
    assert answer is None and written == [] and received == b"" and seen[4] == [b"b\x81\x03one\x81\x02\xc3\xa9"]
    # The send fails (the peer is gone): the transport's own write is handed the reply, to fail as it does.
    answer, seen, _, written = _step(
        step, data, len(data), 100, ["reply-str"], {**setup, "transport": True, "socket": "broken"}
    )
    assert answer is None and written == [b"b\x81\x03one\x81\x02\xc3\xa9"] and seen[4] == []
    # No transport: the core's writer. A closed socket: nothing written, nothing counted out.
    no_transport = {**setup, "transport": False, "socket": "open"}
    answer, seen, _, _ = _step(step, data, len(data), 100, ["reply-str"], no_transport)
    assert seen[4] == [b"b\x81\x03one\x81\x02\xc3\xa9"]
    answer, seen, _, _ = _step(
        step, data, len(data), 100, ["reply-str"], {**setup, "closed": True, "transport": False, "socket": "open"}
    )
    assert answer is None and seen[4] == [] and seen[3][1] == 2000 and seen[2] == []
    # Anything else is answered as steady_read answers it, with only the timer and the bytes in done.
    answer, seen, _, _ = _step(step, data, len(data), 100, ["close"], no_transport)
    assert answer[0] == _frames.STEADY_RESULT and seen[3] == (1000 + len(data), 2000, 3, 7)


@needs_c
def test_steady_step_never_writes_through_a_slot_of_another_class() -> None:
    # A member descriptor taken from one class and set on another points into the first one's layout:
    # Python refuses to use it (TypeError); the C must not read or write at its offset either.
    class Other:
        __slots__ = ("a",)

    class Core:
        __slots__ = (
            "_bytes_out",
            "_handler_object",
            "_handler_state",
            "_messages_in",
            "_module",
            "_out",
            "_socket_closed",
            "_steady_limit",
            "_steady_ok",
            "_writer",
        )
        _steady_idle = None

        def __init__(self) -> None:
            self._steady_ok = True
            self._steady_limit = 100
            self._handler_object = None
            self._handler_state = 0
            self._out = []
            self._messages_in = 0
            self._socket_closed = False
            self._bytes_out = 1000

    Core._bytes_in = Other.__dict__["a"]  # type: ignore[attr-defined]
    core = Core()
    with pytest.raises(TypeError):
        _frames.steady_step(core, bytearray(b"xxxxxxx"), 7, None, -1)
    assert core._bytes_out == 1000


class _RefusingCore(_DictCore):
    """A core that refuses one store: an error path no real core reaches, held equal all the same."""

    refused = "_handler_state"

    def __setattr__(self, name: str, value: Any) -> None:
        if name == self.refused and hasattr(self, name):
            raise AttributeError(f"{name} refused")
        object.__setattr__(self, name, value)


class _RefusingCounts(_RefusingCore):
    refused = "_messages_in"


@needs_c
@pytest.mark.parametrize("kind", [_RefusingCore, _RefusingCounts], ids=["state", "count"])
def test_steady_step_c_and_python_agree_when_a_store_fails(kind: type[_DictCore]) -> None:
    # The output is taken before the stores in both: a failed store loses the reply alike.
    data = frame(1, b"one") + frame(2, b"two")
    seen = []
    for step in (_frames.steady_step, _frames.steady_step_python):
        core = kind(["reply-str", "reply-str"], 100, None, False, [b"b"])
        with pytest.raises(AttributeError, match="refused"):
            step(core, memoryview(bytearray(data)), len(data), None, -1)
        seen.append(core.seen())
    assert seen[0] == seen[1]
    assert seen[0][2] == []  # taken, and not written
