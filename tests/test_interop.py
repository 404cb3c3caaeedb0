"""The same echo scenarios with independent client implementations, compression negotiated where the
client offers it: ``websockets``, ``aiohttp``, ``websocket-client`` and Node's ``ws`` (installed by
``.ci/run`` with npm into ``tests/interop``; skipped where Node or the package is absent)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from pywsserver import start_link

from .recorder import Recorder, server_options
from .wstools import in_client_thread, url

pytestmark = pytest.mark.anyio

BIG = bytes([7]) * 100_000
OUTGOING: list[str | bytes] = ["hello", "héllo ☃", BIG, *[f"n{i}" for i in range(20)]]
INTEROP = Path(__file__).parent / "interop"


async def echo_with(client: Any) -> Any:
    """Run an asyncio ``client(url)`` against a fresh server; it must close with 1000."""
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        result = await in_client_thread(client, url(server))
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
    assert recorder.closes[0][1].code == 1000
    return result


async def test_websockets_client() -> None:
    from websockets.asyncio.client import connect

    async def client(address: str) -> tuple[list[Any], Any]:
        async with connect(address, compression="deflate") as ws:
            for message in OUTGOING:
                await ws.send(message)
            replies = [await ws.recv() for _ in OUTGOING]
            return replies, ws.response.headers.get("Sec-WebSocket-Extensions")

    replies, extensions = await echo_with(client)
    assert replies == OUTGOING
    assert extensions.startswith("permessage-deflate")


async def test_aiohttp_client() -> None:
    import aiohttp

    async def client(address: str) -> tuple[list[Any], Any]:
        async with aiohttp.ClientSession() as session, session.ws_connect(address, compress=15) as ws:
            for message in OUTGOING:
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
            replies = [(await ws.receive()).data for _ in OUTGOING]
            extensions = ws._response.headers.get("Sec-WebSocket-Extensions")
            await ws.close(code=1000)
            return replies, extensions

    replies, extensions = await echo_with(client)
    assert replies == OUTGOING
    assert extensions.startswith("permessage-deflate")


async def test_websocket_client_library() -> None:
    import websocket  # the synchronous websocket-client library; it offers no compression

    def client(address: str) -> list[Any]:
        ws = websocket.create_connection(address, timeout=10)
        try:
            for message in OUTGOING:
                if isinstance(message, str):
                    ws.send(message)
                else:
                    ws.send_binary(message)
            return [ws.recv() for _ in OUTGOING]
        finally:
            ws.close(status=1000)

    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        replies = await anyio.to_thread.run_sync(client, url(server))
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
    assert replies == OUTGOING
    assert recorder.closes[0][1].code == 1000


async def test_node_ws_client() -> None:
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "ws").is_dir():
        pytest.skip("Node.js and the ws package are needed (npm install --prefix tests/interop)")
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        result = await anyio.run_process(
            [node, str(INTEROP / "echo_client.mjs"), url(server)], check=False, stderr=subprocess.STDOUT
        )
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
    output = result.stdout.decode()
    assert result.returncode == 0, output
    report = json.loads(output.strip().splitlines()[-1])
    expected = [m if isinstance(m, str) else {"binary": len(m), "sum": sum(m)} for m in OUTGOING]
    assert report["replies"] == expected
    assert report["closeCode"] == 1000
    assert report["extensions"].startswith("permessage-deflate")
    assert recorder.closes[0][1].code == 1000
