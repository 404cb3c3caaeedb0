"""The asyncio driver's steady read writes its reply to the socket itself, over real sockets.

In the steady state `ProtocolDriver.buffer_updated` hands a read's replies to the socket with one
``send`` when the transport buffers nothing, as the transport's own ``write`` would, and to the
transport's ``write`` otherwise. These tests hold it to every byte in order when the peer stops
reading (a short send, then replies behind buffered bytes) and to the general path's results.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import BytesMessage, Message, TextMessage

from pywsserver import start_link

from .recorder import server_options
from .wstools import RawClient

pytestmark = pytest.mark.anyio


async def whole_message(client: RawClient) -> str | bytes:
    parts: list[str | bytes] = []
    while True:
        event = await client.next_event(timeout=20)
        assert isinstance(event, Message), event
        parts.append(event.data)
        if event.message_finished:
            return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_steady_replies_to_a_peer_that_stops_reading_arrive_whole_and_in_order() -> None:
    async with start_link(server_options(websocket=[("ping_interval", None)])) as server:
        client = await RawClient.connect(server.port)
        await client.send(TextMessage(data="first"))
        assert await client.next_event() == TextMessage(data="first")
        (worker,) = server.workers()
        transport = worker._writer
        # The shortcut is in use (if a Python release renames what it reads, this fails).
        assert worker._driver._plain is transport  # type: ignore[attr-defined]
        sent: list[bytes] = []
        with anyio.fail_after(20):
            # One message per read, each read waited for, the replies never read: the socket's
            # buffers fill, a send is short and the rest waits in the transport.
            while transport.get_write_buffer_size() == 0:  # type: ignore[attr-defined]
                assert len(sent) < 2000, "the socket took every reply"
                payload = len(sent).to_bytes(4, "big") * 15_000
                sent.append(payload)
                await client.send(BytesMessage(data=payload))
                while worker._messages_in < len(sent) + 1 and transport.get_write_buffer_size() == 0:  # type: ignore[attr-defined]
                    await anyio.lowlevel.checkpoint()
                assert worker._steady_ok  # every one of them took the steady read
        after = [f"after {index}".encode() for index in range(5)]
        for payload in after:  # read once the buffered bytes drain: written behind them
            await client.send(BytesMessage(data=payload))
        for payload in [*sent, *after]:
            assert await whole_message(client) == payload
        await client.aclose()


async def test_steady_echoes_of_many_messages_in_one_read_come_back_in_order(anyio_backend: str) -> None:
    async with start_link(server_options(websocket=[("ping_interval", None)])) as server:
        client = await RawClient.connect(server.port)
        messages = [f"message {index}" for index in range(200)]
        await client.stream.send(b"".join(client.ws.send(TextMessage(data=message)) for message in messages))
        assert [await whole_message(client) for _ in messages] == messages
        await client.aclose()
