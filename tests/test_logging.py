"""Every log record about a connection carries its id and peer; the frame log shows the traffic."""

from __future__ import annotations

import logging

import pytest

from pywsserver import ConnectionClosed
from pywsserver.testing import Client, serve_for_test

from .recorder import Recorder, ScriptedHandler

pytestmark = pytest.mark.anyio


async def test_connection_records_carry_the_connection_id_and_peer(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    scripted = serve_for_test(ScriptedHandler, websocket=[("handler_options", {"recorder": recorder})])
    with caplog.at_level(logging.DEBUG, "pywsserver"):
        async with scripted as server, await Client.connect(server) as client:
            await client.send("raise")  # an ERROR record, with the traceback
            with pytest.raises(ConnectionClosed):  # closed with 1011
                await client.receive()
            assert client.close_code == (1011, "internal error")
    worker_records = [r for r in caplog.records if r.name in ("pywsserver.worker", "pywsserver.bad_input")]
    assert any(r.levelno == logging.ERROR for r in worker_records)
    for record in worker_records:
        assert isinstance(record.connection_id, int), record.getMessage()  # type: ignore[attr-defined]
        assert record.peer.startswith("127.0.0.1:"), record.getMessage()  # type: ignore[attr-defined]
        assert record.getMessage().startswith(f"[conn {record.connection_id} ")  # type: ignore[attr-defined]


async def test_the_frame_log_shows_what_was_sent_and_delivered(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "pywsserver.frames"):
        async with serve_for_test("pywsserver.echo") as server, await Client.connect(server) as client:
            await client.send("hello")
            assert await client.receive() == "hello"
    lines = [r.getMessage() for r in caplog.records if r.name == "pywsserver.frames"]
    assert any("sent 'HTTP/1.1 101 Switching Protocols'" in line for line in lines), lines
    assert any("handle('hello')" in line for line in lines), lines
    assert any("sent text(5) b'hello'" in line for line in lines), lines
    assert any("sent close(2)" in line for line in lines), lines


async def test_the_frame_log_costs_nothing_when_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "pywsserver"):
        async with serve_for_test("pywsserver.echo") as server, await Client.connect(server) as client:
            await client.send("hello")
            await client.receive()
            assert server.workers()[0]._frames_log is None
    assert [r for r in caplog.records if r.name == "pywsserver.frames"] == []
