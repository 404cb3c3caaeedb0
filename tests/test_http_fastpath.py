"""The HTTP module's shortcuts held equal to the plain computations they replace (hypothesis)."""

from __future__ import annotations

import base64
import binascii
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from pywsserver.protocols._http import WEBSOCKET_GUID, _has_token, _valid_key, accept_key

# Header values as parsed: no CR, LF or NUL; commas, spaces, tabs and mixed case often.
VALUES = st.text(alphabet=st.sampled_from("aAbBuUpPgGrRdDeEwWsSkKcCoOtT ,\t-é"), max_size=30)
TOKENS = st.sampled_from(["websocket", "upgrade", "keep-alive", "a", ""])


def plain_tokens(values: list[str] | None) -> set[str]:
    """Every comma-separated token of the values, stripped and lower-cased (what the module used to build)."""
    return {token.strip().lower() for value in values or () for token in value.split(",")}


@given(st.none() | st.lists(VALUES, max_size=3), TOKENS)
def test_has_token_is_membership_in_the_plain_token_set(values: list[str] | None, token: str) -> None:
    assert _has_token(values, token) == (token in plain_tokens(values))


@given(st.sampled_from(["websocket", "WebSocket", "Upgrade", "upgrade", "keep-alive, Upgrade", "x"]))
def test_has_token_on_the_usual_values(value: str) -> None:
    for token in ("websocket", "upgrade"):
        assert _has_token([value], token) == (token in plain_tokens([value]))


def plain_valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


@given(
    st.text(max_size=40)
    | st.binary(min_size=0, max_size=20).map(lambda raw: base64.b64encode(raw).decode())
    | st.binary(min_size=16, max_size=16).map(lambda raw: base64.b64encode(raw).decode())
)
def test_valid_key_is_base64_decoding_to_16_bytes(key: str) -> None:
    assert _valid_key(key) == plain_valid_key(key)


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_accept_key_is_the_rfc_computation(key: str) -> None:
    expected = base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode("ascii")
    assert accept_key(key) == expected
