"""Handler results: every shape of the original, as tuples or classes, and clear errors otherwise."""

from __future__ import annotations

import pytest

from pywsserver import (
    Close,
    InvalidHandlerResult,
    NoReply,
    Reply,
    SendPing,
    SendPong,
    normalize_result,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (("noreply", 1), NoReply(1)),
        (("reply", "text", 1), Reply("text", 1)),
        (("reply", b"bin", 1), Reply(b"bin", 1)),
        (("ping", 1), SendPing(1)),
        (("ping", b"data", 1), SendPing(1, b"data")),
        (("ping", "text", 1), SendPing(1, b"text")),
        (("pong", 1), SendPong(1)),
        (("pong", b"data", 1), SendPong(1, b"data")),
        (("close", 1), Close(1)),
        (("close", 4001, "bye", 1), Close(1, 4001, "bye")),
        (("close", 1000, b"bytes reason", 1), Close(1, 1000, "bytes reason")),
        (Reply("x", None), Reply("x", None)),
        (Close(None, 3000), Close(None, 3000)),
    ],
)
def test_every_allowed_shape_normalizes(value: object, expected: object) -> None:
    assert normalize_result(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "reply",
        ("reply", "missing state"),
        ("reply", 42, None),
        ("noreply",),
        ("shout", "x", None),
        ("close", 999, "", None),
        ("close", 1005, "", None),
        ("close", 5000, "", None),
        ("close", 1000, "x" * 124, None),
        ("close", 1000, b"\xff", None),
        ("ping", b"x" * 126, None),
        ("ping", 5, None),
        (1, 2, 3),
        Reply(42, None),  # type: ignore[arg-type]
    ],
)
def test_anything_else_is_an_invalid_result_saying_what_was_expected(value: object) -> None:
    with pytest.raises(InvalidHandlerResult, match=r"expected|must be"):
        normalize_result(value)
