"""The access log: one ``pywsserver.access`` line per connection when it ends, escaped, off on request;
``--log-format json`` writes every line as one JSON object."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest
import websockets
from websockets.asyncio.client import connect

from pywsserver import JSONFormatter, start_link

from .recorder import Recorder, server_options
from .test_processes import ROOT, read_until
from .wstools import in_client_thread, raw_http, url

pytestmark = pytest.mark.anyio


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "pywsserver.access"]


class _Written(logging.Handler):
    """Sets an event at each access line (written by the server's task, on the test's event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


async def wait_for_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    """The access lines once there are ``count``: each is written when its worker ends, after the client left."""
    written = _Written()
    logger = logging.getLogger("pywsserver.access")
    logger.addHandler(written)
    try:
        with anyio.fail_after(10):
            while len(access_records(caplog)) < count:
                await written.event.wait()
                written.event = anyio.Event()
    finally:
        logger.removeHandler(written)
    return access_records(caplog)


async def test_one_line_per_connection_with_what_it_carried_and_how_it_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("subprotocols", ["chat.v1"])])

    async def talk(address: str) -> None:
        async with connect(address, subprotocols=["chat.v1"], compression=None) as ws:
            for text in ("one", "two"):
                await ws.send(text)
                assert await ws.recv() == text
            await ws.close(1000, "bye\nnow")  # a newline in the reason: escaped in the line

    with caplog.at_level(logging.INFO, "pywsserver.access"):
        async with start_link(options) as server:
            await in_client_thread(talk, url(server, "/room%201?x=1"))
            [record] = await wait_for_lines(caplog, 1)
    line = record.getMessage()
    assert "\n" not in line
    assert line.startswith("127.0.0.1:")
    assert "'/room 1' 101 subprotocol='chat.v1' close=1000 by client reason='bye\\nnow'" in line
    assert "in: 2 msgs" in line and "out: 2 msgs" in line
    fields: Any = record
    assert fields.path == "/room 1"
    assert fields.subprotocol == "chat.v1"
    assert fields.status == 101
    assert (fields.close_code, fields.close_reason, fields.closed_by) == (1000, "bye\nnow", "client")
    assert (fields.messages_in, fields.messages_out) == (2, 2)
    assert fields.bytes_in > 2 * (6 + 3) and fields.bytes_out > 2 * (2 + 3)
    assert fields.duration >= 0
    assert fields.peer.startswith("127.0.0.1:") and isinstance(fields.connection_id, int)


async def test_refused_crashed_and_server_closed_connections_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("resources", [("/chat", [])])])

    async def refused(address: str) -> None:
        with pytest.raises(websockets.InvalidStatus):
            async with connect(address):
                pass

    async def command(address: str, text: str) -> None:
        async with connect(address) as ws:
            await ws.send(text)
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()

    with caplog.at_level(logging.INFO, "pywsserver.access"):
        async with start_link(options) as server:
            await in_client_thread(refused, url(server, "/nowhere"))
            [refusal] = await wait_for_lines(caplog, 1)
            await in_client_thread(command, url(server, "/chat"), "raise")
            crash = (await wait_for_lines(caplog, 2))[1]
            await in_client_thread(command, url(server, "/chat"), "close:4001:go away")
            closed = (await wait_for_lines(caplog, 3))[2]
            await raw_http(server.port, b"\x16\x03\x01 not http\r\n\r\n")
            garbage = (await wait_for_lines(caplog, 4))[3]
    fields: Any = refusal
    assert (fields.path, fields.status, fields.close_code) == ("/nowhere", 404, None)
    assert "'/nowhere' 404 subprotocol=None close=- by -" in refusal.getMessage()
    fields = crash
    assert (fields.status, fields.close_code, fields.closed_by, fields.messages_in) == (101, 1011, "server", 1)
    fields = closed
    assert (fields.close_code, fields.close_reason, fields.closed_by) == (4001, "go away", "server")
    fields = garbage
    assert (fields.path, fields.status) == (None, 400)


async def test_the_access_log_is_off_with_the_option_or_the_logger_level(caplog: pytest.LogCaptureFixture) -> None:
    async def once(address: str) -> None:
        async with connect(address) as ws:
            await ws.send("hi")
            await ws.recv()

    with caplog.at_level(logging.INFO, "pywsserver"):
        async with start_link(server_options(Recorder(), access_log=False)) as server:
            await in_client_thread(once, url(server))
            await in_client_thread(once, url(server))
    assert access_records(caplog) == []
    with caplog.at_level(logging.INFO, "pywsserver"):
        logging.getLogger("pywsserver.access").setLevel(logging.WARNING)
        try:
            async with start_link(server_options(Recorder())) as server:
                await in_client_thread(once, url(server))
        finally:
            logging.getLogger("pywsserver.access").setLevel(logging.NOTSET)
    assert access_records(caplog) == []


def test_the_json_formatter_writes_one_object_per_line_with_the_extra_fields() -> None:
    logger = logging.getLogger("pywsserver.test_json")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "bad %r", ("line\nbreak",), None, extra={"peer": "1.2.3.4:5", "n": 3}
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    text = JSONFormatter().format(record)
    assert "\n" not in text
    data = json.loads(text)
    assert data["message"] == "bad 'line\\nbreak'"
    assert (data["level"], data["logger"], data["peer"], data["n"]) == ("ERROR", "pywsserver.test_json", "1.2.3.4:5", 3)
    assert "ValueError: boom" in data["exception"]
    assert data["time"].endswith("+00:00")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_command_line_logs_json_lines_and_turns_the_access_log_off(backend: str) -> None:
    for flags, expect_access in (([], True), (["--no-access-log"], False)):
        command = [sys.executable, "-m", "pywsserver", "--port", "0", "--log-format", "json", "--backend", backend]
        process = await anyio.open_process(command + flags, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log: list[bytes] = []
        try:
            port = int((await read_until(process, rb'listening on 127\.0\.0\.1:(\d+)"', log)).group(1))
            await read_until(process, rb"serving on", log)

            async def once(address: str) -> None:
                async with connect(address) as ws:
                    await ws.send("hi")
                    assert await ws.recv() == "hi"

            await in_client_thread(once, f"ws://127.0.0.1:{port}/path")
            if expect_access:
                await read_until(process, rb"pywsserver\.access", log)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                assert await process.wait() == 0
            assert process.stdout is not None
            with anyio.fail_after(10):
                async for chunk in process.stdout:
                    log.append(chunk)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        lines = [json.loads(line) for line in b"".join(log).decode().splitlines() if line.strip()]
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
        access = [line for line in lines if line["logger"] == "pywsserver.access"]
        if expect_access:
            [entry] = access
            assert (entry["path"], entry["status"], entry["close_code"], entry["closed_by"]) == (
                "/path",
                101,
                1000,
                "client",
            )
            assert (entry["messages_in"], entry["messages_out"]) == (1, 1)
        else:
            assert access == []
            assert any("received SIGINT" in line["message"] for line in lines)
