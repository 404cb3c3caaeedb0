"""Bad clients are reported, but cannot flood the log."""

from __future__ import annotations

import logging

import pytest

from pywsserver import _throttle as throttle_module
from pywsserver import start_link
from pywsserver._throttle import ThrottledReport
from pywsserver._worker import bad_input

from .recorder import server_options
from .wstools import RawClient, no_connections, raw_http


def test_one_line_per_kind_per_interval_and_the_next_says_how_many_were_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(throttle_module.time, "monotonic", lambda: now[0])
    report = ThrottledReport(logging.getLogger("test.throttle"), interval=10)
    with caplog.at_level(logging.INFO, "test.throttle"):
        for index in range(50):
            report("bad handshakes", f"client {index}")
            report("protocol violations", f"client {index}")
        now[0] += 10
        report("bad handshakes", "client 50")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "bad handshakes: client 0",
        "protocol violations: client 0",
        "bad handshakes: client 50 (and 49 more in the last 10s, not shown)",
    ]


@pytest.mark.anyio
async def test_a_storm_of_bad_clients_logs_one_line_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    bad_input.reset()  # another test may have reported within the interval
    with caplog.at_level(logging.DEBUG):
        caplog.set_level(logging.INFO, "pywsserver")
        # A loaded machine may stall the loop past the watchdog's default: that WARNING is not bad input.
        async with start_link(server_options(loop_watchdog=None)) as server:
            for _ in range(30):
                await raw_http(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            for _ in range(30):
                client = await RawClient.connect(server.port)
                await client.send_raw(bytes((0x81, 0x01, ord("x"))))  # unmasked: 1002
                assert await client.next_event() is not None
                await client.aclose()
            assert await no_connections(server)
    bad = [r for r in caplog.records if r.name == "pywsserver.bad_input"]
    assert sorted(r.getMessage().split(":")[0] for r in bad) == ["bad handshakes", "protocol violations"]
    assert [r for r in caplog.records if r.name.startswith("pywsserver") and r.levelno >= logging.WARNING] == []
