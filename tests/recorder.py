"""A scriptable handler that records what the server tells it, for the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from pywsserver import ConnectionClose, Worker


class Recorder:
    """Shared by every connection of one test server (passed through ``handler_options``)."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.inits: list[dict[str, Any]] = []
        self.messages: list[tuple[int, Any]] = []
        self.closes: list[tuple[int, ConnectionClose]] = []
        self.open_now = 0
        self.max_open = 0
        self._changed = anyio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()

    def closes_of(self, connection: int) -> list[ConnectionClose]:
        return [close for index, close in self.closes if index == connection]


class ScriptedHandler:
    """Text messages are commands: ``reply:x``, ``binary:x``, ``ping``, ``ping:x``, ``pong``, ``pong:x``,
    ``close``, ``close:CODE:REASON``, ``raise``, ``invalid``, ``noreply``; other messages are echoed."""

    def init(self, options: dict[str, Any]) -> dict[str, Any]:
        recorder: Recorder = options["recorder"]
        recorder.workers.append(options["worker"])
        recorder.inits.append(options)
        recorder.open_now += 1
        recorder.max_open = max(recorder.max_open, recorder.open_now)
        recorder.changed()
        return {"recorder": recorder, "index": len(recorder.workers) - 1}

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        recorder: Recorder = state["recorder"]
        index: int = state["index"]
        if isinstance(message, ConnectionClose):
            recorder.closes.append((index, message))
            recorder.open_now -= 1
            recorder.changed()
            return ("noreply", state)
        recorder.messages.append((index, message))
        recorder.changed()
        if not isinstance(message, str):
            return ("reply", message, state) if isinstance(message, bytes) else ("noreply", state)
        command, _, argument = message.partition(":")
        if command == "reply":
            return ("reply", argument, state)
        if command == "binary":
            return ("reply", argument.encode(), state)
        if command == "ping":
            return ("ping", argument.encode(), state) if argument else ("ping", state)
        if command == "pong":
            return ("pong", argument.encode(), state) if argument else ("pong", state)
        if command == "close":
            if argument:
                code, _, reason = argument.partition(":")
                return ("close", int(code), reason, state)
            return ("close", state)
        if command == "raise":
            raise RuntimeError("the handler failed on purpose")
        if command == "invalid":
            return ("shout", state)
        if command == "noreply":
            return ("noreply", state)
        await anyio.lowlevel.checkpoint()
        return ("reply", message, state)


class SyncRecordingHandler(ScriptedHandler):
    """Sync callbacks only (the server's workers then stop cooperatively, see tests/test_cooperative_stop.py):
    records as `ScriptedHandler` does, and echoes every message."""

    def handle(self, message: Any, state: dict[str, Any]) -> Any:
        recorder: Recorder = state["recorder"]
        if isinstance(message, ConnectionClose):
            recorder.closes.append((state["index"], message))
            recorder.open_now -= 1
            recorder.changed()
            return ("noreply", state)
        recorder.messages.append((state["index"], message))
        recorder.changed()
        return ("reply", message, state)


def server_options(
    recorder: Recorder | None = None, *, websocket: Any = (), sync: bool = False, **top: Any
) -> list[tuple[str, Any]]:
    """Options for a test server: with a recorder, `ScriptedHandler` (``sync``: `SyncRecordingHandler`)."""
    scripted = SyncRecordingHandler if sync else ScriptedHandler
    handler: Any = scripted if recorder is not None else "pywsserver.echo"
    ws_options: list[tuple[str, Any]] = [("handler_module", handler), *websocket]
    if recorder is not None:
        ws_options.append(("handler_options", {"recorder": recorder}))
    top.setdefault("port", 0)
    return [
        *top.items(),
        ("worker_options", [("protocol_modules", [("websocket", ws_options)])]),
    ]
