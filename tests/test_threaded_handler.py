"""A handler's sync callbacks run in worker threads (`threaded`): blocking code stalls no other connection.

One connection's handler blocks in ``time.sleep`` until the test lets it go;
meanwhile another client's echo must come back. Events, not timings, say so:
the second client's echo is checked to have arrived while the first handler
was still blocked. Per connection the contract is unchanged: one call at a
time, in order.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from pywsserver import ConnectionClose, start_link, threaded

from .wstools import in_client_thread, url

pytestmark = pytest.mark.anyio


class Blocking:
    """Echoes; on ``"block"`` sleeps (blocking its thread) until released, at most 10 s."""

    def __init__(self) -> None:
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.sleep_ended = threading.Event()
        self.still_blocked_when_echoed: list[bool] = []
        self.calls: list[tuple[str, int]] = []
        self.active: dict[int, int] = {}
        self.lock = threading.Lock()

    def init(self, options: dict[str, Any]) -> int:
        return id(options["worker"])

    def handle(self, message: object, state: int) -> Any:
        with self.lock:
            self.active[state] = self.active.get(state, 0) + 1
            assert self.active[state] == 1, "two calls at once on one connection"
        try:
            if isinstance(message, ConnectionClose):
                return ("ok", state)
            self.calls.append((str(message), state))
            if message == "block":
                self.blocked.set()
                deadline = time.monotonic() + 10
                while not self.release.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.sleep_ended.set()
            elif message == "hello":
                self.still_blocked_when_echoed.append(not self.sleep_ended.is_set())
            return ("reply", message, state)
        finally:
            with self.lock:
                self.active[state] -= 1


def options(handler: Any) -> list[tuple[str, Any]]:
    return [("port", 0), ("worker_options", [("protocol_modules", [("websocket", [("handler_module", handler)])])])]


async def test_a_blocking_threaded_handler_does_not_delay_another_connections_echo() -> None:
    """Erlang's scheduler preempts a process once it has used its reductions: a connection whose handler
    blocks delays only itself. threaded(handler) gives the same to blocking sync callbacks (the other
    client's echo comes back while the first handler still blocks), with one call at a time, in order."""
    blocking = Blocking()
    async with start_link(options(threaded(blocking, max_threads=4))) as server:

        async def blocked_client(address: str) -> list[str]:
            from websockets.asyncio.client import connect

            async with connect(address) as ws:
                for text in ("block", "after 1", "after 2"):  # queued behind the blocked call, kept in order
                    await ws.send(text)
                return [str(await ws.recv()) for _ in range(3)]

        async def other_client(address: str) -> str:
            from websockets.asyncio.client import connect

            async with connect(address) as ws:
                await ws.send("hello")
                return str(await ws.recv())

        async with anyio.create_task_group() as tg:
            replies: list[list[str]] = []

            async def first() -> None:
                replies.append(await in_client_thread(blocked_client, url(server)))

            tg.start_soon(first)
            await anyio.to_thread.run_sync(blocking.blocked.wait, 20)
            assert await in_client_thread(other_client, url(server)) == "hello"
            blocking.release.set()
    assert blocking.still_blocked_when_echoed == [True]  # the echo came back while the other handler slept
    assert replies == [["block", "after 1", "after 2"]]


def test_threaded_checks_its_bound() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        threaded(Blocking, max_threads=0)
