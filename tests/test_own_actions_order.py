"""What an async handler queues for its own connection goes out in the order it was queued, before its reply.

An ``await send``, a broadcast that reaches the sender and a ``send_nowait``, then the reply: the
client must see them in that order, on every driver; and a handler whose sends wait for room in
its mailbox goes on once the peer reads. Over TLS on trio the stream driver carries them (anyio's
``TLSStream``); on asyncio the TLS pump; plain connections take the asyncio and trio drivers, and
on trio the acceptor can be made to hand anyio streams over (the stream driver on a plain socket,
as before the trio driver).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import trustme
from websockets.asyncio.client import connect

import pywsserver._server
from pywsserver import ConnectionClose, broadcast, start_link
from pywsserver._stream_driver import StreamDriver
from pywsserver._trio_tls import TrioTLSDriver

from .reliability_tools import UPGRADE, masked_frame, take_server_frames
from .wstools import in_client_thread

pytestmark = pytest.mark.anyio

GROUP = "own-actions-order"
ROUNDS = 40


class OwnActions:
    """``N``: ``await send``, a broadcast to the sender's group, ``send_nowait``, then the reply, all
    tagged N; ``flood:N``: N sends of 100,000 bytes (they wait for room), then the reply ``sent N``."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, Any] = options["seen"]
        worker = options["worker"]
        worker.join(GROUP)
        seen["workers"].append(worker)
        seen["drivers"].append(type(worker._driver))
        return {"worker": worker}

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        if isinstance(message, ConnectionClose):
            return ("noreply", state)
        worker = state["worker"]
        if message.startswith("flood:"):
            count = int(message[6:])
            for index in range(count):
                await worker.send(bytes([index % 256]) * 100_000)
            return ("reply", f"sent {count}", state)
        await worker.send(f"send {message}")
        broadcast(GROUP, f"broadcast {message}")
        worker.send_nowait(f"nowait {message}")
        return ("reply", f"reply {message}", state)


async def run_rounds(address: str, context: ssl.SSLContext | None) -> list[Any]:
    """The client (websockets, in a thread): every round's message at once, then all that comes back."""
    async with connect(address, ssl=context, compression=None) as ws:
        for index in range(ROUNDS):
            await ws.send(str(index))
        return [await ws.recv() for _ in range(4 * ROUNDS)]


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


PATHS = ["plain", "tls", "streams", "tls-streams"]


def server_options(
    path: str, anyio_backend: str, authority: trustme.CA, monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]
) -> tuple[list[tuple[str, Any]], ssl.SSLContext | None]:
    """The server's options for ``path``, and the client's TLS context (``None`` for plain)."""
    if path in ("streams", "tls-streams"):
        if anyio_backend != "trio":
            pytest.skip("the acceptor hands anyio streams over only on trio")
        monkeypatch.setattr(pywsserver._server, "_on_trio", lambda: False)
    websocket = [("handler_module", OwnActions), ("handler_options", {"seen": seen})]
    options: list[tuple[str, Any]] = [
        ("port", 0),
        ("worker_options", [("protocol_modules", [("websocket", websocket)])]),
    ]
    if not path.startswith("tls"):
        return options, None
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    options.append(("tls", server_context))
    return options, client_context


@pytest.mark.parametrize("path", PATHS)
async def test_an_async_handlers_own_actions_arrive_in_order_before_its_reply(
    path: str, anyio_backend: str, authority: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {"workers": [], "drivers": []}
    options, client_context = server_options(path, anyio_backend, authority, monkeypatch, seen)
    async with start_link(options) as server:
        scheme = "wss" if client_context is not None else "ws"
        answers = await in_client_thread(run_rounds, f"{scheme}://127.0.0.1:{server.port}/", client_context)
    if anyio_backend == "trio" and path != "plain":
        assert seen["drivers"] == [TrioTLSDriver if path == "tls" else StreamDriver]
    expected = [f"{kind} {index}" for index in range(ROUNDS) for kind in ("send", "broadcast", "nowait", "reply")]
    assert answers == expected


def read_frames(sock: socket.socket) -> list[bytes]:
    """The client's reads (blocking, each bounded by the socket's timeout): the payloads of the
    server's frames (unfragmented, unmasked), the upgrade's answer skipped, until ``sent N``."""
    buffer = bytearray()
    messages: list[bytes] = []
    while True:
        chunk = sock.recv(1 << 20)
        assert chunk, f"the server closed the connection after {len(messages)} messages"
        buffer += chunk
        if take_server_frames(buffer, messages, b"sent "):
            return messages


@pytest.mark.parametrize("path", PATHS)
async def test_a_handler_waiting_for_room_for_its_own_sends_goes_on_once_the_peer_reads(
    path: str, anyio_backend: str, authority: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's sends fill what the driver holds, then the mailbox, until ``await send`` waits for
    room; the peer then reads, and every message arrives in order, then the reply."""
    seen: dict[str, Any] = {"workers": [], "drivers": []}
    options, client_context = server_options(path, anyio_backend, authority, monkeypatch, seen)
    async with start_link(options) as server:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for the server
        raw.settimeout(10)  # every blocking call of the client below is bounded
        raw.connect(("127.0.0.1", server.port))
        sock: socket.socket = raw
        try:
            if client_context is not None:  # the handshake needs the server's loop: in a thread
                sock = await anyio.to_thread.run_sync(
                    lambda: client_context.wrap_socket(raw, server_hostname="127.0.0.1")
                )
            await anyio.to_thread.run_sync(sock.sendall, UPGRADE + masked_frame(0x1, b"flood:40"))
            with anyio.fail_after(20):
                while not (seen["workers"] and seen["workers"][0]._room is not None):
                    await anyio.lowlevel.checkpoint()  # lets the server run; bounded by the timeout
            messages = await anyio.to_thread.run_sync(read_frames, sock)
            assert messages == [bytes([index % 256]) * 100_000 for index in range(40)] + [b"sent 40"]
        finally:
            sock.close()
    if anyio_backend == "trio" and path != "plain":
        assert seen["drivers"] == [TrioTLSDriver if path == "tls" else StreamDriver]
