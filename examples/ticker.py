"""A ticker: a supervised background task pushes data to every connected client.

The tree::

    Supervisor (one_for_one)
    ├── ticker          a plain task that broadcasts "tick N <time>" to the "ticker" group
    └── the WebSocket server

Clients only listen: each connection's worker joins the group in ``init``.
Run it with ``python examples/ticker.py`` and connect::

    python -m websockets ws://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import anyio
import anyio.abc

import pywsserver
from pywsserver import broadcast
from pywsserver.supervision import ChildSpec, Supervisor


async def ticker(interval: float, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Broadcast a tick to the "ticker" group every ``interval`` seconds."""
    task_status.started()
    number = 0
    while True:
        await anyio.sleep(interval)
        number += 1
        broadcast("ticker", f"tick {number} {time.strftime('%H:%M:%S')}")


class Listener:
    """The handler: join the group, ignore what the client says."""

    def init(self, options: dict[str, Any]) -> None:
        options["worker"].join("ticker")

    def handle(self, message: object, state: None) -> tuple[str, None]:
        return ("noreply", state)


def ticker_tree(port: int = 8080, interval: float = 1.0) -> Supervisor:
    """The ticker and the server, side by side under one supervisor."""
    server_options = [
        ("port", port),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", Listener)])])]),
    ]
    return Supervisor(
        [ChildSpec("ticker", ticker, args=(interval,)), pywsserver.server_child_spec(server_options, id="server")],
        name="ticker-app",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Push ticks to every WebSocket client")
    parser.add_argument("--port", type=int, default=8080)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pywsserver.run(ticker_tree(parser.parse_args().port))  # until Ctrl+C or SIGTERM, then a graceful stop
