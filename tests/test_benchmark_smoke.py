"""The benchmark suite runs: its load generator builds and measures a pywsserver server briefly.

Only that it runs is checked here; speed is measured by ``benchmarks/run.py``, never asserted in tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the load generator")


def test_the_load_generator_builds_and_measures_a_server() -> None:
    import run as bench

    loadgen = bench.build("loadgen")
    server = bench.Server("pywsserver")
    try:
        echo = bench.run_loadgen(loadgen, server.port, ["echo", "--conns", "4", "--size", "64"], 0.5)
        assert echo["messages"] > 0
        assert echo["p99_ms"] >= echo["p50_ms"] > 0
        churn = bench.run_loadgen(loadgen, server.port, ["churn", "--parallel", "4"], 0.5)
        assert churn["handshakes"] > 0
        fanout = bench.run_loadgen(loadgen, server.port, ["broadcast", "--conns", "20", "--count", "5"], 1)
        assert fanout["deliveries"] == fanout["expected"] == 5 * 21
        arguments = ["broadcast", "--conns", "20", "--count", "5", "--one-at-a-time"]
        one = bench.run_loadgen(loadgen, server.port, arguments, 1)
        assert one["deliveries"] == one["expected"] == 5 * 21
        assert one["p99_ms"] >= one["p50_ms"] > 0
    finally:
        server.stop()


def test_the_c_websocket_ceiling_serves_a_real_client_and_the_generator() -> None:
    """The minimal C server the WebSocket scenarios are measured against (``wsceiling.c``) speaks
    WebSocket to the ``websockets`` client (the accept key, echo, a large message, a broadcast,
    ping and close), and the generator measures it in every mode it is used for."""
    import asyncio

    import run as bench
    from websockets.asyncio.client import connect

    server = bench.Server("wsceiling", [str(bench.build("wsceiling")), "0"])
    try:

        async def talk() -> None:
            url = f"ws://127.0.0.1:{server.port}/"
            async with connect(url) as first, connect(url) as second:
                await first.send("hello")
                assert await first.recv() == "hello"
                await first.send(b"\x01" * 70_000)
                assert await first.recv() == b"\x01" * 70_000
                await first.send("go:3:5")
                assert [await second.recv() for _ in range(3)] == ["bbbbb"] * 3
                assert [await first.recv() for _ in range(3)] == ["bbbbb"] * 3
                await asyncio.wait_for(await first.ping(), 10)
            assert (first.close_code, second.close_code) == (1000, 1000)

        asyncio.run(talk())
        loadgen = bench.build("loadgen")
        assert bench.run_loadgen(loadgen, server.port, ["echo", "--conns", "4", "--size", "64"], 0.5)["messages"] > 0
        assert bench.run_loadgen(loadgen, server.port, ["churn", "--parallel", "4"], 0.5)["handshakes"] > 0
        arguments = ["broadcast", "--conns", "20", "--count", "5", "--one-at-a-time"]
        one = bench.run_loadgen(loadgen, server.port, arguments, 1)
        assert one["deliveries"] == one["expected"] == 5 * 21
    finally:
        server.stop()


def test_the_report_has_a_row_per_server_and_a_ratio_to_websockets() -> None:
    import run as bench

    results = {
        "machine": {"cpu": "test", "cores": 2, "python": "3"},
        "command": "run.py",
        "baseline": {},
        "scenarios": {
            "small": {
                "pywsserver": {"rate": 300.0, "p50_ms": 1.0, "p99_ms": 2.0, "peak_rss_kib": 2048},
                "websockets": {"rate": 200.0, "p50_ms": 1.0, "p99_ms": 2.0, "peak_rss_kib": 2048},
            }
        },
    }
    report = bench.table(results)
    assert "| pywsserver | 300.0 | 1.00 | 2.00 | 2.0 | 1.50x |" in report
    assert (
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], capture_output=True).returncode
        == 0
    )


def test_the_tls_scenarios_measure_a_tls_server_with_the_python_clients() -> None:
    import run as bench

    with bench.certificate() as certfile:
        server = bench.Server("pywsserver", certfile=certfile)
        try:
            held = bench.idle_per_connection(None, server, ["idle", "--conns", "20"])
            assert held["opened"] == 20
            churn = bench.tls_churn(server, ["churn", "--parallel", "4", "--processes", "2"], 0.5)
            assert churn["count"] > 0
            assert churn["p99_ms"] >= churn["p50_ms"] > 0
            assert churn["server_cpu_ms"] > 0
        finally:
            server.stop()
