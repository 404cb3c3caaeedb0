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
        (("ping", b"data", 1), SendPing(b"data", 1)),
        (("ping", "text", 1), SendPing(b"text", 1)),
        (("pong", 1), SendPong(1)),
        (("pong", b"data", 1), SendPong(b"data", 1)),
        (("close", 1), Close(1)),
        (("close", 4001, "bye", 1), Close(4001, "bye", 1)),
        (("close", 1000, b"bytes reason", 1), Close(1000, "bytes reason", 1)),
        (Reply("x", None), Reply("x", None)),
        (Close(3000, "", None), Close(code=3000, state=None)),
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


@pytest.mark.parametrize(
    ("tuple_form", "class_form"),
    [
        (("noreply", "S"), NoReply("S")),
        (("reply", "data", "S"), Reply("data", "S")),
        (("ping", "S"), SendPing("S")),
        (("ping", b"data", "S"), SendPing(b"data", "S")),
        (("pong", "S"), SendPong("S")),
        (("pong", b"data", "S"), SendPong(b"data", "S")),
        (("close", "S"), Close("S")),
        (("close", 4000, "bye", "S"), Close(4000, "bye", "S")),
    ],
)
def test_each_class_takes_the_arguments_of_its_tuple_in_the_same_order(tuple_form: tuple, class_form: object) -> None:
    assert normalize_result(tuple_form) == class_form
    assert class_form == type(class_form)(*tuple_form[1:])


def test_the_result_classes_take_keywords_with_the_state_named() -> None:
    assert Close(code=4000, reason="bye", state=1) == Close(4000, "bye", 1)
    assert Close(state=1) == Close(1) == Close(1000, "", 1)
    assert SendPing(data=b"x", state=1) == SendPing(b"x", 1)
    assert SendPong(state=1) == SendPong(b"", 1)


def test_the_earlier_close_argument_order_still_works_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"Close\(code, reason, state\)"):
        old = Close("S", 4000, "bye")
    assert old == Close(4000, "bye", "S")
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert Close("S", 4001) == Close(4001, "", "S")


@pytest.mark.parametrize("arguments", [(), (1, 2, 3, 4), ("a", "b")])
def test_a_result_class_given_another_number_of_arguments_says_which_shapes_it_takes(arguments: tuple) -> None:
    with pytest.raises(TypeError, match=r"takes \(State\), \(Code, Reason, State\)"):
        Close(*arguments)
