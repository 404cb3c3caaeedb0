"""Unmasking: the C speedup and the pure-Python fallback agree with the RFC's definition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pywsserver.protocols import _mask


def by_the_rfc(payload: bytes, mask: bytes) -> bytes:
    # RFC 6455 section 5.3: transformed-octet-i = original-octet-i XOR masking-key-octet-(i MOD 4)
    return bytes(octet ^ mask[i % 4] for i, octet in enumerate(payload))


@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_the_python_fallback_follows_the_rfc(payload: bytes, mask: bytes) -> None:
    assert _mask.unmask_python(payload, mask) == by_the_rfc(payload, mask)


@pytest.mark.skipif(not _mask.SPEEDUPS, reason="the C speedup was not built (no compiler at install)")
@given(st.binary(max_size=3000), st.binary(min_size=4, max_size=4))
def test_the_c_speedup_follows_the_rfc(payload: bytes, mask: bytes) -> None:
    assert _mask.unmask(payload, mask) == by_the_rfc(payload, mask)
    assert _mask.unmask(bytearray(payload), memoryview(mask)) == by_the_rfc(payload, mask)


@pytest.mark.skipif(not _mask.SPEEDUPS, reason="the C speedup was not built (no compiler at install)")
def test_the_c_speedup_refuses_a_mask_that_is_not_four_bytes() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        _mask.unmask(b"data", b"abc")
