from typing import Any

def apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes: ...
def parse_frames(
    data: bytes | bytearray | memoryview, limit: int
) -> tuple[list[str | bytes | tuple[int, bytes]], int, int, str | None]: ...
def encode_frame(data: str | bytes) -> bytes: ...
def steady_read(
    buffer: bytes | bytearray | memoryview,
    nbytes: int,
    limit: int,
    handler: Any,
    state: Any,
    out: list[bytes],
    core: Any,
) -> tuple[Any, ...]: ...
def steady_step(core: Any, buffer: bytes | bytearray | memoryview, nbytes: int, transport: Any, fd: int) -> Any: ...
