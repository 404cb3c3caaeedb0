"""Prometheus metrics, scraped over HTTP and read with prometheus-client's own parser, while real clients
connect, send, get refused, crash a handler and close; on the server's port, on a port of their own, and
from two server processes in one scrape."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from wsproto.events import TextMessage

from pywsserver import OptionError, broadcast, start_link
from pywsserver._options import parse_options
from pywsserver.protocols import HTTPProtocol

from .recorder import Recorder, server_options
from .test_processes import ROOT, pids_serving, read_until
from .wstools import RawClient, in_client_thread, raw_http, url

pytestmark = pytest.mark.anyio

Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Figures:
    figures: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return figures


async def scrape(port: int, path: str = "/metrics") -> Figures:
    answer = await raw_http(port, f"GET {path} HTTP/1.1\r\nHost: prometheus\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert b"Content-Type: text/plain; version=" in head
    return parse(body.decode())


def value(figures: Figures, name: str, **labels: str) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_options(recorder: Recorder, **top: Any) -> list[tuple[str, Any]]:
    options = server_options(recorder, websocket=[("resources", [("/chat", [])])], **top)
    options[-1][1][0][1].append(("http", [("metrics_path", "/metrics")]))
    return options


async def test_figures_move_as_clients_connect_send_get_refused_crash_and_close() -> None:
    recorder = Recorder()
    async with start_link(metrics_options(recorder)) as server:
        before = await scrape(server.port)
        # The scrape's own connection is accepted and open while the figures are rendered.
        assert value(before, "pywsserver_connections_accepted_total") == 1
        assert value(before, "pywsserver_connections_open") == 1

        async def talk(address: str) -> list[Any]:
            async with connect(address, compression=None) as ws:
                replies = []
                for text in ("one", "two", "three"):
                    await ws.send(text)
                    replies.append(await ws.recv())
                await ws.send(b"\x00" * 1000)
                replies.append(await ws.recv())
                return replies

        assert await in_client_thread(talk, url(server, "/chat")) == ["one", "two", "three", b"\x00" * 1000]
        after = await scrape(server.port)
        assert value(after, "pywsserver_connections_accepted_total") == 3  # two scrapes and the client
        assert value(after, "pywsserver_messages_received_total") == 4
        assert value(after, "pywsserver_messages_sent_total") == 4
        assert value(after, "pywsserver_bytes_received_total") > 1000 + 3 * 5
        assert value(after, "pywsserver_bytes_sent_total") > 1000 + 3 * 5
        assert value(after, "pywsserver_closes_total", code="1000", closed_by="client") == 1

        async def refused(address: str) -> int:
            with pytest.raises(websockets.InvalidStatus) as refusal:
                async with connect(address):
                    pass
            return refusal.value.response.status_code

        assert await in_client_thread(refused, url(server, "/nowhere")) == 404
        assert value(await scrape(server.port), "pywsserver_handshakes_refused_total", status="404") == 1

        async def crash(address: str) -> int | None:
            async with connect(address) as ws:
                await ws.send("raise")
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await ws.recv()
                return closed.value.rcvd.code if closed.value.rcvd else None

        assert await in_client_thread(crash, url(server, "/chat")) == 1011
        crashed = await scrape(server.port)
        assert value(crashed, "pywsserver_handler_errors_total") == 1
        assert value(crashed, "pywsserver_closes_total", code="1011", closed_by="server") == 1

        async def closed_by_server(address: str) -> int | None:
            async with connect(address) as ws:
                await ws.send("close:4000:bye")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                return closed.value.rcvd.code if closed.value.rcvd else None

        assert await in_client_thread(closed_by_server, url(server, "/chat")) == 4000
        last = await scrape(server.port)
        assert value(last, "pywsserver_closes_total", code="4000", closed_by="server") == 1
        assert value(last, "pywsserver_closes_total", code="1000", closed_by="client") == 1
        assert value(last, "pywsserver_connections_open") == 1
        assert value(last, "pywsserver_event_loop_lag_seconds") >= 0


async def test_live_connections_are_counted_before_they_close() -> None:
    recorder = Recorder()
    async with start_link(metrics_options(recorder)) as server, anyio.create_task_group() as tg:
        stop = anyio.Event()
        said = anyio.Event()

        async def hold() -> None:
            client = await RawClient.connect(server.port, "/chat")
            try:
                await client.send(TextMessage("hello"))
                assert await client.next_event() == TextMessage("hello")
                said.set()
                await stop.wait()
            finally:
                await client.aclose()

        tg.start_soon(hold)
        with anyio.fail_after(10):
            await said.wait()
        figures = await scrape(server.port)
        assert value(figures, "pywsserver_connections_open") == 2  # the client and the scrape
        assert value(figures, "pywsserver_messages_received_total") == 1
        assert value(figures, "pywsserver_messages_sent_total") == 1
        stop.set()


async def test_broadcasts_and_a_restarted_acceptor_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    async with start_link(metrics_options(recorder, number_of_workers=1)) as server:
        original = server._accept
        faults = [RuntimeError("injected accept fault")]

        async def faulty_accept(listener: Any, lock: Any) -> Any:
            if faults:
                raise faults.pop()
            return await original(listener, lock)

        monkeypatch.setattr(server, "_accept", faulty_accept)
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))  # the new acceptor meets the fault

        async def member(address: str) -> str:
            async with connect(address) as ws:
                await ws.send("noreply")  # recorded, not answered
                return str(await ws.recv())

        async with anyio.create_task_group() as tg:
            got: list[str] = []

            async def run_member() -> None:
                got.append(await in_client_thread(member, url(server, "/chat")))

            tg.start_soon(run_member)
            await recorder.wait_for(lambda: len(recorder.messages) == 1)
            recorder.workers[0].join("room")
            assert broadcast("room", "to all").delivered == 1
        assert got == ["to all"]
        figures = await scrape(server.port)
        assert value(figures, "pywsserver_supervisor_restarts_total", supervisor="acceptors") == 1
        assert value(figures, "pywsserver_supervisor_give_ups_total", supervisor="acceptors") == 0
        assert value(figures, "pywsserver_broadcast_members_total", result="delivered") >= 1
        assert value(figures, "pywsserver_messages_sent_total") == 1  # the broadcast


async def test_metrics_on_a_port_of_their_own_with_a_sync_handler() -> None:
    async with start_link(server_options(metrics_port=0)) as server:  # pywsserver.echo: a sync handler
        assert server.metrics is not None and server.metrics.port is not None

        async def once(address: str) -> Any:
            async with connect(address) as ws:
                await ws.send("hi")
                return await ws.recv()

        assert await in_client_thread(once, url(server)) == "hi"
        figures = await scrape(server.metrics.port, "/metrics")
        assert value(figures, "pywsserver_connections_accepted_total") == 1
        assert value(figures, "pywsserver_messages_received_total") == 1
        assert value(figures, "pywsserver_messages_sent_total") == 1
        assert value(figures, "pywsserver_connections_open") == 0  # the metrics port is not a WebSocket port
        assert value(figures, "pywsserver_closes_total", code="1000", closed_by="client") == 1
        refused = await raw_http(server.metrics.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 405 ")
        garbage = await raw_http(server.metrics.port, b"\x00\x01garbage\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")


def test_metric_options_are_checked_with_their_full_path() -> None:
    options = server_options()
    options[-1][1][0][1].append(("http", [("metrics_path", "metrics")]))
    with pytest.raises(OptionError, match=r"worker_options\.protocol_modules\.http\.metrics_path: expected a path"):
        parse_options(options)
    with pytest.raises(OptionError, match=r"^metrics_port: expected an int"):
        parse_options(server_options(metrics_port="9100"))
    with pytest.raises(OptionError, match=r"^metrics_port: must differ from port"):
        parse_options(server_options(port=9100, metrics_port=9100))
    with pytest.raises(OptionError, match=r"^access_log: expected"):
        parse_options(server_options(access_log="no"))
    with pytest.raises(OptionError, match=r"metrics_path: '/healthz' is already the health_check_path"):
        HTTPProtocol.parse_options([("health_check_path", "/healthz"), ("metrics_path", "/healthz")], "http")


def test_without_prometheus_client_the_option_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "prometheus_client" else real(name, *a)
    )
    with pytest.raises(OptionError, match=r"^metrics_port: metrics need prometheus-client: pip install"):
        parse_options(server_options(metrics_port=9100))


@contextlib.asynccontextmanager
async def two_processes_with_metrics(temporary: Path) -> AsyncIterator[tuple[anyio.abc.Process, list[bytes], int]]:
    command = [
        sys.executable,
        "-m",
        "pywsserver",
        "--port",
        "0",
        "--processes",
        "2",
        "--handler",
        "tests.pid_handler",
        "--metrics-path",
        "/metrics",
        "--no-access-log",
    ]
    environment = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    environment["TMPDIR"] = str(temporary)  # where the parent makes the directory of the figures
    process = await anyio.open_process(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
    )
    log: list[bytes] = []
    try:
        port = int((await read_until(process, rb"2 server processes share port (\d+)", log)).group(1))
        await read_until(process, rb"(?s)serving on.*serving on", log)
        yield process, log, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_with_two_processes_one_scrape_has_the_figures_of_both(tmp_path: Path) -> None:
    async with two_processes_with_metrics(tmp_path) as (process, _, port):
        assert [path.name.startswith("pywsserver-metrics-") async for path in anyio.Path(tmp_path).iterdir()] == [True]
        pids = await pids_serving(port, 40)
        assert len(pids) == 2, pids  # the kernel spread the 40 connections over both
        with anyio.fail_after(20):
            while True:  # every process syncs its figures once a second
                figures = await scrape(port)
                if value(figures, "pywsserver_messages_received_total") == 40:
                    break
                await anyio.sleep(0.2)
        assert value(figures, "pywsserver_messages_sent_total") == 40
        assert sum(v for (name, _), v in figures.items() if name == "pywsserver_closes_total") == 40
        lag_pids = {dict(labels)["pid"] for (name, labels) in figures if name == "pywsserver_event_loop_lag_seconds"}
        assert lag_pids == pids
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            assert await process.wait() == 0
    assert [path async for path in anyio.Path(tmp_path).iterdir()] == []  # the parent removed the directory it made
