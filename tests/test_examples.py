"""Every example runs, and the command line starts, serves and stops on a signal."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest
from websockets.asyncio.client import connect

from examples.chat import ChatHandler, chat_tree, member_name
from examples.ticker import ticker_tree
from pywsserver import groups
from pywsserver.supervision import call
from pywsserver.testing import Client

from .wstools import in_client_thread, raw_http

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


async def _serve_and_talk(command: list[str]) -> tuple[list[object], int, str]:
    """Start a server process, echo through it, stop it with SIGINT; return answers, exit code, log."""
    process = await anyio.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = b""
    try:
        assert process.stdout is not None
        with anyio.fail_after(20):
            while not (found := re.search(rb"listening on 127\.0\.0\.1:(\d+)", log)):
                log += await process.stdout.receive()
        port = int(found.group(1))

        async def client() -> list[object]:
            async with connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send("text")
                text = await ws.recv()
                await ws.send(b"bytes")
                return [text, await ws.recv()]

        answers = await in_client_thread(client)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            async for chunk in process.stdout:
                log += chunk
            code = await process.wait()
        return answers, code, log.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_cli_runs_the_echo_server_and_stops_on_sigint() -> None:
    answers, code, log = await _serve_and_talk([sys.executable, "-m", "pywsserver", "--port", "0"])
    assert answers == ["text", b"bytes"]
    assert code == 0, log
    assert "received SIGINT: stopping" in log


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_cli_serves_on_trio_too() -> None:
    command = [sys.executable, "-m", "pywsserver", "--port", "0", "--backend", "trio"]
    answers, code, _ = await _serve_and_talk(command)
    assert (answers, code) == (["text", b"bytes"], 0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_echo_example_runs_with_one_command() -> None:
    answers, code, _ = await _serve_and_talk([sys.executable, "examples/echo.py", "--port", "0"])
    assert (answers, code) == (["text", b"bytes"], 0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--handler", "json"],
            b"worker_options.protocol_modules.websocket.handler_module: module 'json' has no function",
        ),
        (["--certfile", "missing.pem"], b"tls.certfile: no such file 'missing.pem'"),
    ],
)
async def test_the_cli_refuses_bad_options_with_their_path(arguments: list[str], message: bytes) -> None:
    result = await anyio.run_process(
        [sys.executable, "-m", "pywsserver", "--port", "0", *arguments], cwd=ROOT, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr


async def test_the_chat_handler_without_a_room_asks_to_try_again() -> None:
    from pywsserver import Reply
    from pywsserver.testing import HandlerDriver

    driver = HandlerDriver(ChatHandler)
    await driver.open()
    assert driver.worker.groups == {"chat"}
    busy = json.dumps({"type": "busy", "text": "the room is busy or restarting, try again"})
    assert await driver.handle("hello") == Reply(busy, driver.state)
    await driver.close()


def test_a_chat_member_is_named_by_the_query_string_or_a_guest() -> None:
    assert member_name("name=ann", 7) == "ann"
    assert member_name("name=%20ann%20&name=bob", 7) == "ann"
    assert member_name("name=%C3%A9lodie", 7) == "\u00e9lodie"
    assert member_name("", 7) == "guest-7"
    assert member_name("name=", 7) == "guest-7"
    assert member_name("name=" + "a" * 25, 7) == "guest-7"
    assert member_name("name=a%0Ab", 7) == "guest-7"  # not printable: no forged log lines


async def test_the_chat_page_is_served_beside_the_endpoint_it_talks_to() -> None:
    tree = chat_tree(port=0)
    async with tree.running():
        server = next(row.ref for row in tree.which_children() if row.id == "server")
        page = await raw_http(server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/html; charset=utf-8" in page
        assert b"`${scheme}//${location.host}/ws?name=${encodeURIComponent(name)}`" in page
        # What the page's script does, done by a client: connect to /ws and chat.
        async with await Client.connect(server, "/ws?name=page") as browser:
            assert json.loads(str(await browser.receive())) == {"type": "joined", "who": "page", "members": 1}
            await browser.send("hello from the page")
            said = json.loads(str(await browser.receive()))
            assert said == {"type": "said", "who": "page", "text": "hello from the page"}
        # Anything else is not a page: 426 for plain requests, 404 for WebSocket requests elsewhere.
        other = await raw_http(server.port, b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert other.startswith(b"HTTP/1.1 426 ")


async def test_the_chat_room_broadcasts_to_everyone() -> None:
    tree = chat_tree(port=0)
    connected, go = threading.Event(), threading.Event()
    async with tree.running():
        server = next(row.ref for row in tree.which_children() if row.id == "server")
        address = f"ws://127.0.0.1:{server.port}/ws"

        async def clients() -> tuple[object, ...]:
            async with connect(f"{address}?name=ann") as ann:
                joins = [await ann.recv()]
                async with connect(f"{address}?name=bob") as bob:
                    joins += [await ann.recv(), await bob.recv()]
                    connected.set()
                    await asyncio.to_thread(go.wait, 10)
                    await ann.send("hello bob")
                    first = await ann.recv(), await bob.recv()
                    await bob.send("hi ann")
                    second = await ann.recv(), await bob.recv()
                return (*joins, *first, *second, await ann.recv())

        async with anyio.create_task_group() as tg:
            result: list[tuple[object, ...]] = []

            async def run_clients() -> None:
                result.append(await in_client_thread(clients))

            tg.start_soon(run_clients)
            await anyio.to_thread.run_sync(connected.wait, 10)
            with anyio.fail_after(5):
                while await call("chat_room", "members") != 2:  # both joined the group
                    await anyio.lowlevel.checkpoint()
            go.set()
        # The joins (ann saw both, bob his own), what each said, then ann saw bob leave (his client closed).
        ann_joined = {"type": "joined", "who": "ann", "members": 1}
        bob_joined = {"type": "joined", "who": "bob", "members": 2}
        hello = {"type": "said", "who": "ann", "text": "hello bob"}
        hi = {"type": "said", "who": "bob", "text": "hi ann"}
        left = {"type": "left", "who": "bob", "code": 1000, "members": 1}
        received = [json.loads(str(text)) for text in result[0]]
        assert received == [ann_joined, bob_joined, bob_joined, hello, hello, hi, hi, left]
        with anyio.fail_after(5):
            while await call("chat_room", "members") != 0:  # both left
                await anyio.lowlevel.checkpoint()
        assert await call("chat_room", "said") == 2


async def test_the_ticker_pushes_to_every_client_from_a_supervised_task() -> None:
    tree = ticker_tree(port=0, interval=0.05)
    async with tree.running():
        server = next(row.ref for row in tree.which_children() if row.id == "server")

        async def clients() -> list[list[object]]:
            async with connect(f"ws://127.0.0.1:{server.port}/") as a, connect(f"ws://127.0.0.1:{server.port}/") as b:
                return [[await ws.recv() for _ in range(3)] for ws in (a, b)]

        ticks = await in_client_thread(clients)
        for received in ticks:
            numbers = [int(str(tick).split()[1]) for tick in received]
            assert numbers == sorted(numbers)
            assert len(set(numbers)) == 3
        with anyio.fail_after(5):
            while groups.count("ticker"):
                await anyio.lowlevel.checkpoint()
