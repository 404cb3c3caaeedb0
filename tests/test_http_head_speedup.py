"""The C parse of a request head (``_speedups.parse_head``) held equal to the Python parse (hypothesis).

The C takes the common case only and answers ``None`` for anything else, which the Python parse
then answers, with its error: so wherever the C answers, it must answer what the Python parse
builds, and wherever the Python parse refuses a head, the C must leave it to it. The heads are
made from the parts of real requests, mutated (control characters, spaces, percent-escapes,
bytes above 127, bare CR and LF, empty lines and names), and arbitrary bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywsserver.protocols import _http
from pywsserver.protocols._http import BadRequest, Request, parse_request_head, parse_request_head_python

speedups = pytest.importorskip("pywsserver._speedups")
parse_head = speedups.parse_head

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ODD = ["", " ", "\t", "\r", "\n", "\x00", "\x7f", "\x1f", "\x80", "\xe9", "\xff", ":", "%", "%41", "%2f", "?", "/"]


def mostly(usual: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    """One of ``usual`` nine times in ten, else one of ``odd``."""
    return st.integers(0, 9).flatmap(lambda n: st.sampled_from(odd if n == 0 else usual))


METHODS = mostly(["GET", "POST", "M-SEARCH", "!#$%&'*+-.^_`|~"], ["get", "G E", "", "GET\x00", "\xe9", "GET:"])
TARGETS = st.lists(
    mostly(["/", "/chat", "a", "?", "q=1", "&", "~", "-"], ["%", "%20", "%41", " ", "\x7f", "\xe9", "\t"]),
    min_size=1,
    max_size=5,
).map("".join)
VERSIONS = mostly(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9"],
    ["HTTP/1.10", "HTTP/1,1", "HTTP/a.1", "http/1.1", "HTTP/1.", "", "HTTP/\xb2.1"],
)
NAMES = mostly(
    # The names the C parse keeps strings of (in their usual spelling, in others, and near misses).
    [
        *["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "sec-websocket-key", "X", "x", "X-Y"],
        *["HOST", "hOsT", "Sec-Websocket-Version", "Sec-WebSocket-Extensions", "ORIGIN", "Origin"],
        *["User-Agent", "Cookie", "X-Forwarded-For", "Hosts", "Hos", "Upgrade-", "Sec-WebSocket-Ke"],
    ],
    ["", "Bad Name", "\xc4", "A\x00", "A\tB", "Ho\xf3t"],
)
VALUES = st.lists(mostly(["websocket", "Upgrade", "13", "a", " ", "\t", ",", "\xe9", "=="], ODD), max_size=6).map(
    "".join
)
SEPARATORS = mostly(["\r\n"], ["\n", "\r", "\r\r\n", " \r\n", "\r\n\r\n", "\r\n "])
COLONS = mostly([":", ": ", ":\t", ":  "], ["", " :", "::"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    line = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"
    if draw(st.integers(0, 9)) == 0:
        line = draw(st.sampled_from(["", " ", "GET  / HTTP/1.1", "GET / HTTP/1.1 x", "GET /", " GET / HTTP/1.1"]))
    parts = [line]
    for _ in range(draw(st.integers(0, 7))):
        parts.append(draw(SEPARATORS))
        parts.append(f"{draw(NAMES)}{draw(COLONS)}{draw(VALUES)}")
    return "".join(parts).encode("latin-1")


def both(head: bytes) -> tuple[object, Request | None]:
    try:
        expected: Request | None = parse_request_head_python(head)
    except BadRequest:
        expected = None
    return parse_head(head), expected


def check(head: bytes) -> None:
    answer, expected = both(head)
    if expected is None:
        assert answer is None, head
        with pytest.raises(BadRequest):
            parse_request_head(head)
        return
    if answer is not None:
        assert answer == (
            expected.method,
            expected.target,
            expected.path,
            expected.query,
            expected.version,
            expected.headers.raw,
            expected.headers._index,
        ), head
    combined = parse_request_head(head)
    assert combined == expected
    assert combined.headers.raw == expected.headers.raw
    assert dict(combined.headers) == dict(expected.headers)
    assert {name: combined.headers.get_all(name) for name in combined.headers} == {
        name: expected.headers.get_all(name) for name in expected.headers
    }


@SETTINGS
@given(heads())
def test_the_c_parse_answers_as_the_python_parse_or_leaves_the_head_to_it(head: bytes) -> None:
    check(head)


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes(head: bytes) -> None:
    check(head)


@SETTINGS
@given(heads(), st.binary(max_size=20), st.integers(0, 400))
def test_heads_with_bytes_spliced_in(head: bytes, noise: bytes, at: int) -> None:
    check(head[:at] + noise + head[at:])


def test_the_usual_request_is_parsed_in_c() -> None:
    head = (
        b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Tab:\ta\tb \t"
    )
    answer = parse_head(head)
    assert answer is not None
    assert answer[2:5] == ("/chat", "room=1", (1, 1))
    assert answer[6]["x-tab"] == ["a\tb"]
    check(head)
    assert _http._parse_head is parse_head  # the module uses it


@pytest.mark.parametrize(
    "head", [b"GET / HTTP/1.1", bytearray(b"GET / HTTP/1.1\r\nA: b"), memoryview(b"GET / HTTP/1.1")]
)
def test_any_bytes_like_object(head: bytes) -> None:
    assert parse_head(head) is not None


def test_not_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_head("GET / HTTP/1.1")


def test_many_headers_and_repeated_names_answer_as_the_python_parse() -> None:
    lines = [b"GET /a?b=c HTTP/1.1"]
    for number in range(300):
        lines.append(b"X-Same: %d" % number if number % 3 else b"x-n%d:\t v%d \t" % (number, number))
    head = b"\r\n".join(lines)
    assert parse_head(head) is not None
    check(head)


def test_reference_counts_are_left_as_they_were() -> None:
    """The C keeps no reference to its argument, and takes none from shared objects (None, small
    ints, interned strings) that it does not give back."""
    import sys

    heads = [
        b"GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nUpgrade: again",
        b"GET /%41 HTTP/1.1\r\nHost: a",  # left to the Python parse
        b"bad",
    ]
    for head in heads:
        parse_head(head)  # anything made once (interned names) made before counting
    before = [sys.getrefcount(head) for head in heads], sys.getrefcount(None), sys.getrefcount(1)
    for _ in range(2000):
        for head in heads:
            parse_head(head)
    after = [sys.getrefcount(head) for head in heads], sys.getrefcount(None), sys.getrefcount(1)
    assert after == before
