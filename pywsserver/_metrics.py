"""The server's Prometheus metrics, through ``prometheus-client`` (the ``pywsserver[metrics]`` extra).

Nothing here runs per message, nor calls the library per connection: the
connection cores count in plain integers, `pywsserver._telemetry.Telemetry`
adds each ended connection to the server's totals, and `Metrics.sync` moves
the difference since its last call into the library's counters. A scrape
syncs first, so its figures are exact to the moment; with several server
processes (prometheus-client's multiprocess mode: each process writes its
figures to files in a directory the parent makes, and a scrape answered by any
process reads them all) every process also syncs once a second.

The metrics child of the server tree (last, so that its restart touches
nothing else) measures the event loop's lag, syncs, and serves the
``metrics_port`` if one is given. The loop watchdog's figures (blocks seen,
the longest) are read from `pywsserver._watchdog.LoopWatchdog` at each sync.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from . import _broadcast
from ._telemetry import COUNTS
from .protocols._http import http_response, parse_request_head

if TYPE_CHECKING:
    from ._server import Server
    from ._watchdog import LoopWatchdog
    from .supervision import Supervisor

__all__ = ["MULTIPROCESS_DIRECTORY", "Metrics"]

logger = logging.getLogger("pywsserver.metrics")

#: The environment variable prometheus-client's multiprocess mode reads its directory from.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
#: How often the event loop's lag is probed, and (with several processes) how often figures are synced.
PROBE_INTERVAL = 0.25
SYNC_EVERY = 4  # probes
#: A metrics port's bounds: requests served at once, bytes of a request head, seconds to send it.
PORT_CONNECTIONS = 8
PORT_REQUEST_SIZE = 8192
PORT_TIMEOUT = 5.0

_RESULTS = ("delivered", "dropped", "closed")
_COUNTER_HELP = {
    "bytes_in": ("pywsserver_bytes_received_total", "Bytes received from clients (HTTP and WebSocket, after TLS)."),
    "bytes_out": ("pywsserver_bytes_sent_total", "Bytes sent to clients (HTTP and WebSocket, before TLS)."),
    "messages_in": ("pywsserver_messages_received_total", "Messages handed to handlers' handle."),
    "messages_out": ("pywsserver_messages_sent_total", "Messages sent: replies, send() and broadcasts."),
    "handler_errors": (
        "pywsserver_handler_errors_total",
        "Handler callbacks that raised or returned an invalid result (the connection closed with 1011).",
    ),
    "mailbox_full": (
        "pywsserver_mailbox_full_total",
        "Actions refused because a connection's mailbox was full (send_nowait, broadcasts to slow members).",
    ),
}


def multiprocess() -> bool:
    """Whether figures go through prometheus-client's multiprocess files (its directory is set)."""
    return bool(os.environ.get(MULTIPROCESS_DIRECTORY))


class Metrics:
    """One server's metrics: made by the server when metrics are on."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._multiprocess = multiprocess()
        if self._multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus-client chose its value class when it was imported, perhaps before the parent
            # set the directory: from now on this process's metrics go to the files.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._counters = [Counter(name, text, registry=registry) for name, text in (_COUNTER_HELP[c] for c in COUNTS)]
        self._accepted = Counter(
            "pywsserver_connections_accepted_total",
            "Connections accepted (TCP, TLS or Unix socket).",
            registry=registry,
        )
        self._open = Gauge(
            "pywsserver_connections_open",
            "Connections being served now (handshaking, open or closing).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._refused = Counter(
            "pywsserver_handshakes_refused_total",
            "Opening handshakes refused, by the HTTP status answered.",
            ["status"],
            registry=registry,
        )
        self._closes = Counter(
            "pywsserver_closes_total",
            "WebSocket connections ended, by the close code the handler was told and who began the close.",
            ["code", "closed_by"],
            registry=registry,
        )
        self._supervisor_events = {
            "restart": Counter(
                "pywsserver_supervisor_restarts_total",
                "Restarts made by the server's supervisors.",
                ["supervisor"],
                registry=registry,
            ),
            "give_up": Counter(
                "pywsserver_supervisor_give_ups_total",
                "Times a server supervisor exceeded its restart intensity and gave up.",
                ["supervisor"],
                registry=registry,
            ),
        }
        self._broadcasts = Counter(
            "pywsserver_broadcast_members_total",
            "Broadcast copies by what became of them: delivered, dropped (slow member), closed (slow member).",
            ["result"],
            registry=registry,
        )
        self._lag = Gauge(
            "pywsserver_event_loop_lag_seconds",
            "The longest delay of the event loop seen in the last second (a timer's lateness).",
            registry=registry,
            multiprocess_mode="liveall",
        )
        watchdog = server.watchdog
        #: The watchdog with its two figures, read at each sync (see _watchdog: one writer each).
        self._watchdog_figures: tuple[LoopWatchdog, Counter, Gauge] | None = None
        if watchdog is not None:
            blocks = Counter(
                "pywsserver_event_loop_blocks_total",
                "Times the loop watchdog saw the event loop blocked longer than loop_watchdog seconds.",
                registry=registry,
            )
            longest_block = Gauge(
                "pywsserver_event_loop_longest_block_seconds",
                "The longest the event loop was blocked since the server started, as the watchdog measured it.",
                registry=registry,
                multiprocess_mode="max",
            )
            self._watchdog_figures = (watchdog, blocks, longest_block)
        # What was last moved into the library's counters.
        self._pushed = [0] * len(COUNTS)
        self._pushed_accepted = 0
        self._pushed_closes: dict[tuple[int, str], int] = {}
        self._pushed_refused: dict[int, int] = {}
        self._pushed_broadcasts = self._broadcast_totals()
        self._supervisor_counts: dict[tuple[str, str], int] = {}
        self._pushed_supervisor: dict[tuple[str, str], int] = {}
        self._max_lag = 0.0
        self._pushed_blocks = 0
        #: The metrics port actually listened on (useful with port 0), once listening.
        self.port: int | None = None
        for result in _RESULTS:
            self._broadcasts.labels(result)

    # ------------------------------------------------------------------ figures

    def _supervisor_names(self) -> dict[int, str]:
        server = self._server
        names = {
            id(server.supervisor): "server",
            id(server.worker_supervisor): "workers",
            id(server.acceptor_supervisor): "acceptors",
        }
        if server.cluster is not None:
            names[id(server.cluster.supervisor)] = "cluster"
        return names

    def observe(self, supervisor: Supervisor, event: str, child_id: Hashable) -> None:
        """A supervisor's restart or give-up (a `pywsserver.supervision.add_observer` observer)."""
        name = self._supervisor_names().get(id(supervisor))
        if name is not None and event in self._supervisor_events:
            key = (event, name)
            self._supervisor_counts[key] = self._supervisor_counts.get(key, 0) + 1

    @staticmethod
    def _broadcast_totals() -> tuple[int, int, int]:
        totals = _broadcast.totals
        return (totals.delivered, totals.dropped, totals.closed)

    def sync(self) -> None:
        """Move what happened since the last sync into the library's metrics."""
        telemetry = self._server._telemetry
        assert telemetry is not None
        for index, total in enumerate(telemetry.totals()):
            if total > self._pushed[index]:
                self._counters[index].inc(total - self._pushed[index])
                self._pushed[index] = total
        if telemetry.accepted > self._pushed_accepted:
            self._accepted.inc(telemetry.accepted - self._pushed_accepted)
            self._pushed_accepted = telemetry.accepted
        self._open.set(len(telemetry.live))
        _push(self._closes, telemetry.closes, self._pushed_closes)
        _push(self._refused, telemetry.refused, self._pushed_refused)
        for (event, name), count in self._supervisor_counts.items():
            pushed = self._pushed_supervisor.get((event, name), 0)
            if count > pushed:
                self._supervisor_events[event].labels(name).inc(count - pushed)
                self._pushed_supervisor[event, name] = count
        broadcasts = self._broadcast_totals()
        for result, total, pushed in zip(_RESULTS, broadcasts, self._pushed_broadcasts, strict=True):
            if total > pushed:
                self._broadcasts.labels(result).inc(total - pushed)
        self._pushed_broadcasts = broadcasts
        self._lag.set(self._max_lag)
        if self._watchdog_figures is not None:
            watchdog, blocks_counter, longest_block = self._watchdog_figures
            blocks = watchdog.blocked_count  # written by the watchdog's thread only: read whole
            if blocks > self._pushed_blocks:
                blocks_counter.inc(blocks - self._pushed_blocks)
                self._pushed_blocks = blocks
            longest_block.set(watchdog.max_lag)

    def render(self) -> tuple[str, bytes]:
        """Sync, then the text a scrape gets: ``(content_type, body)``."""
        try:
            self.sync()
            if self._multiprocess:
                registry = CollectorRegistry()
                MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
                return CONTENT_TYPE_LATEST, generate_latest(registry)
            return CONTENT_TYPE_LATEST, generate_latest(self.registry)
        except Exception:
            logger.exception("the metrics could not be rendered")
            raise

    # -------------------------------------------------------- the tree's child

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probe the event loop's lag, sync (several processes), serve the metrics port: the metrics child."""
        options = self._server.options
        for name in self._supervisor_names().values():  # shown at 0 from the start
            for counter in self._supervisor_events.values():
                counter.labels(name)
        async with anyio.create_task_group() as tg:
            if options.metrics_port is not None:
                listener = await anyio.create_tcp_listener(
                    local_host=options.host if options.host not in ("", "0.0.0.0", "::") else None,
                    local_port=self.port if self.port is not None else options.metrics_port,
                    reuse_port=options.reuse_port,
                )
                self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
                logger.info("metrics on http://%s:%d/metrics", options.host or "*", self.port)
                limiter = anyio.Semaphore(PORT_CONNECTIONS)
                for socket_listener in listener.listeners:
                    tg.start_soon(self._serve_port, cast(anyio.abc.SocketListener, socket_listener), limiter)
            task_status.started()
            await self._probe()

    async def _probe(self) -> None:
        probes = 0
        while True:
            before = anyio.current_time()
            await anyio.sleep(PROBE_INTERVAL)
            lag = anyio.current_time() - before - PROBE_INTERVAL
            probes += 1
            if probes == 1:
                self._max_lag = max(lag, 0.0)
            else:
                self._max_lag = max(self._max_lag, lag)
            if probes == SYNC_EVERY:
                probes = 0
                if self._multiprocess:
                    self.sync()
                else:
                    self._lag.set(self._max_lag)

    async def _serve_port(self, listener: anyio.abc.SocketListener, limiter: anyio.Semaphore) -> None:
        async with listener, anyio.create_task_group() as tg:
            while True:
                await limiter.acquire()
                try:
                    stream = await listener.accept()
                except BaseException:
                    limiter.release()
                    raise
                tg.start_soon(self._answer, stream, limiter)

    async def _answer(self, stream: anyio.abc.ByteStream, limiter: anyio.Semaphore) -> None:
        try:
            async with stream:
                head = b""
                with anyio.move_on_after(PORT_TIMEOUT):
                    while b"\r\n\r\n" not in head and len(head) <= PORT_REQUEST_SIZE:
                        head += await stream.receive()
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    response = http_response(400 if head else 408, body=b"incomplete request\n")
                else:
                    response = self._respond(head[:end])
                with anyio.move_on_after(PORT_TIMEOUT):
                    await stream.send(response)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        finally:
            limiter.release()

    def _respond(self, head: bytes) -> bytes:
        try:
            request = parse_request_head(head)
        except Exception:
            return http_response(400, body=b"malformed request\n")
        if request.method not in ("GET", "HEAD"):
            return http_response(405, [("Allow", "GET, HEAD")], b"the metrics are read with GET\n")
        try:
            content_type, body = self.render()
        except Exception:
            return http_response(500, body=b"the metrics could not be rendered\n")
        response = http_response(200, [("Content-Type", content_type)], body)
        return response[: len(response) - len(body)] if request.method == "HEAD" else response


def _push(counter: Counter, totals: dict[Any, int], pushed: dict[Any, int]) -> None:
    for key, total in totals.items():
        before = pushed.get(key, 0)
        if total > before:
            labels = key if isinstance(key, tuple) else (key,)
            counter.labels(*(str(label) for label in labels)).inc(total - before)
            pushed[key] = total
