"""Unmasking client frames (RFC 6455 section 5.3): XOR with the frame's repeated 4-byte key.

The C speedup (``pywsserver._speedups``, built at install when a compiler is there) does it eight
bytes at a time; without it, the pure-Python fallback XORs the payload as one big integer, which is
the fastest way CPython offers. Both give the same bytes (``tests/test_mask.py``).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SPEEDUPS", "unmask", "unmask_python"]


def unmask_python(payload: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask``, in pure Python."""
    length = len(payload)
    if not length:
        return b""
    key = (bytes(mask) * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


unmask: Callable[[bytes | bytearray | memoryview, bytes | bytearray | memoryview], bytes]
try:
    from .._speedups import apply_mask as unmask

    #: Whether the C speedup is in use.
    SPEEDUPS = True
except ImportError:  # pragma: no cover - depends on the installation
    unmask = unmask_python
    SPEEDUPS = False
