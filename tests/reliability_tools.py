"""What the reliability tests measure: the server's resources before and after an ordeal."""

from __future__ import annotations

import gc
import os
import socket
import struct
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from pywsserver import Worker, groups

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def open_descriptors() -> int:
    """File descriptors open in this process (Linux), or -1 where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def live_workers() -> int:
    """Worker objects still reachable: a leak keeps them alive after their connection."""
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, Worker))


class Baseline:
    """Resources of the process at one moment, to compare with after an ordeal."""

    def __init__(self) -> None:
        self.descriptors = open_descriptors()
        self.tasks = len(anyio.get_running_tasks())
        self.workers = live_workers()

    async def assert_restored(self, server: Any, timeout: float = 10) -> None:
        """The server holds no more than before: no connection, worker, task, group or descriptor left."""
        with anyio.fail_after(timeout):
            while server.connections or len(anyio.get_running_tasks()) > self.tasks:
                await anyio.lowlevel.checkpoint()
        assert live_workers() <= self.workers
        assert groups.which_groups() == []
        if self.descriptors >= 0:
            assert open_descriptors() <= self.descriptors


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame with a zero mask (the payload goes out as is)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        header = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    return header + b"\0\0\0\0" + payload


def take_server_frames(buffer: bytearray, messages: list[bytes], last: bytes) -> bool:
    """Move the payloads of the server's whole frames (unfragmented, unmasked) from ``buffer`` to
    ``messages``, the upgrade's answer skipped; ``True`` once a payload starting with ``last`` came."""
    if buffer.startswith(b"HTTP/"):  # the upgrade's answer first
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        assert buffer.startswith(b"HTTP/1.1 101"), bytes(buffer[:40])
        del buffer[: end + 4]
    while len(buffer) >= 2:
        size, header = buffer[1] & 0x7F, 2
        if size == 126:
            size, header = int.from_bytes(buffer[2:4], "big"), 4
        elif size == 127:
            size, header = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < header + size:
            return False
        messages.append(bytes(buffer[header : header + size]))
        del buffer[: header + size]
        if messages[-1].startswith(last):
            return True
    return False


async def reset(stream: anyio.abc.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a broken network does."""
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def wait_until(condition: Any, timeout: float = 20) -> None:
    """Let the server run until ``condition()`` holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.lowlevel.checkpoint()
