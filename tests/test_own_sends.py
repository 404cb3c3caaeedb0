"""An async handler that sends into its own connection faster than the peer reads.

Its sends wait in the mailbox once the driver holds more than ``write_buffer_size`` for the kernel;
they must go out in order, before the reply the handler returns, and an ``await send`` waiting for
room must be let go once the peer reads, although the connection's task is the handler's own.
Over real loopback sockets, on both backends (asyncio's protocol driver, trio's driver).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from pywsserver import ConnectionClose, start_link

from .reliability_tools import UPGRADE, masked_frame, take_server_frames, wait_until

pytestmark = pytest.mark.anyio

#: Bytes each message of ``fill`` carries; the ``write_buffer_size`` of these servers.
PART = 20_000
BOUND = 65_536


class OwnSender:
    """``fill``: sends until the driver holds more than the bound, one more message (queued in the
    mailbox), then replies; ``flood:N``: N sends of 100,000 bytes (they wait for room), then replies."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, Any] = options["seen"]
        seen["workers"].append(options["worker"])
        return {"seen": seen, "worker": options["worker"]}

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        if isinstance(message, ConnectionClose):
            return ("noreply", state)
        worker = state["worker"]
        if message == "fill":
            count = 0
            while worker._can_write:
                await worker.send(bytes([count % 256]) * PART)
                count += 1
                assert count < 5000, "the kernel took 100 MB for a peer that does not read"
            await worker.send(b"after")  # the driver takes no more: this one waits in the mailbox
            return ("reply", f"sent {count}", state)
        count = int(message.split(":")[1])
        for index in range(count):
            await worker.send(bytes([index % 256]) * 100_000)
        return ("reply", f"sent {count}", state)


def options(seen: dict[str, Any]) -> list[tuple[str, Any]]:
    websocket = [("handler_module", OwnSender), ("handler_options", {"seen": seen}), ("max_message_size", 1 << 20)]
    return [
        ("port", 0),
        ("worker_options", [("write_buffer_size", BOUND), ("protocol_modules", [("websocket", websocket)])]),
    ]


async def read_messages(sock: socket.socket, timeout: float = 30) -> list[bytes]:
    """The payloads of the server's frames (unfragmented, unmasked), the upgrade's answer skipped,
    until the handler's reply (``sent N``)."""
    buffer = bytearray()
    messages: list[bytes] = []
    with anyio.fail_after(timeout):
        while True:
            await anyio.wait_readable(sock)
            chunk = sock.recv(1 << 20)
            assert chunk, f"the server closed the connection after {len(messages)} messages"
            buffer += chunk
            if take_server_frames(buffer, messages, b"sent "):
                return messages
    raise AssertionError("unreachable")


def slow_reader(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for the server
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_sends_queued_in_the_mailbox_go_out_before_the_handlers_reply(anyio_backend: str) -> None:
    seen: dict[str, Any] = {"workers": []}
    async with start_link(options(seen)) as server:
        sock = slow_reader(server.port)
        try:
            sock.sendall(UPGRADE + masked_frame(0x1, b"fill"))
            messages = await read_messages(sock)
            count = len(messages) - 2
            assert count > 0
            assert messages[count:] == [b"after", f"sent {count}".encode()], "the reply came before the last send"
            assert messages[:count] == [bytes([index % 256]) * PART for index in range(count)]
        finally:
            sock.close()


async def test_a_handler_waiting_for_room_for_its_own_sends_goes_on_once_the_peer_reads(anyio_backend: str) -> None:
    seen: dict[str, Any] = {"workers": []}
    async with start_link(options(seen)) as server:
        sock = slow_reader(server.port)
        try:
            sock.sendall(UPGRADE + masked_frame(0x1, b"flood:40"))
            await wait_until(lambda: len(seen["workers"]) == 1 and seen["workers"][0]._room is not None)
            messages = await read_messages(sock)
            assert messages == [bytes([index % 256]) * 100_000 for index in range(40)] + [b"sent 40"]
        finally:
            sock.close()
