"""The core's steady-state path (a read parsed where it lies, the handler answered without effect
objects) does what the general path does, for any client bytes split anywhere and any handler result."""

from __future__ import annotations

import itertools
import logging
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywsserver import Worker, _core, broadcast
from pywsserver._core import ConnectionCore
from pywsserver._options import parse_options
from pywsserver.protocols import CloseAction
from pywsserver.protocols._frames import steady_step, steady_step_python
from pywsserver.supervision import groups

from .test_websocket_fastpath import client_frames, encode

_groups = itertools.count()
#: The steady path's one call per read: the C speedup's (when built) and its pure-Python twin.
READS = {"default": steady_step, "python": steady_step_python}

#: What the handler does with the n-th message (cycling through the drawn script).
RESULTS = [
    "echo",  # ("reply", message, state)
    "noreply",
    "reply-bytes",
    "raise",
    "nonsense",  # 42
    "bad-reply",  # ("reply", 5, state)
    "close",  # ("close", 1000)
    "ping",  # ("ping", b"p", state)
    "awaitable",  # a coroutine: refused
    "send",  # send_nowait, then echo
    "close-call",  # the connection closed during the call (as close() does), then echo
    "broadcast",  # a broadcast to the connection's own group, then noreply
    "tuple-subclass",  # a tuple subclass saying noreply: the general path decides
]


class _Tuple(tuple):  # type: ignore[type-arg]
    __slots__ = ()


async def _never() -> None:
    pass


class ScriptHandler:
    """Answers each message as the script says; records what it was told."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.log: list[Any] = []
        self.worker: Any = None
        self.group = ""

    def init(self, options: dict[str, Any]) -> int:
        self.script = options["script"]
        self.log = options["log"]
        self.worker = options["worker"]
        self.group = options["group"]
        self.worker.join(self.group)
        return 0

    def handle(self, message: Any, state: int) -> Any:
        self.log.append((type(message).__name__, message, state))
        if not isinstance(message, str | bytes):
            return ("noreply", state)
        what = self.script[state % len(self.script)] if self.script else "echo"
        state += 1
        if what == "echo":
            return ("reply", message, state)
        if what == "noreply":
            return ("noreply", state)
        if what == "reply-bytes":
            return ("reply", b"r" + (message.encode() if isinstance(message, str) else message), state)
        if what == "raise":
            raise ValueError("the handler failed")
        if what == "nonsense":
            return 42
        if what == "bad-reply":
            return ("reply", 5, state)
        if what == "close":
            return ("close", 1000)
        if what == "ping":
            return ("ping", b"p", state)
        if what == "awaitable":
            return _never()
        if what == "send":
            self.worker.send_nowait("sent")
            return ("reply", message, state)
        if what == "close-call":
            self.worker._offer(CloseAction(1000, "bye"))
            return ("reply", message, state)
        if what == "broadcast":
            broadcast(self.group, "all")
            return ("noreply", state)
        return _Tuple(("noreply", state))


class BareWorker(Worker):
    """A worker whose driver the test attaches (no socket)."""

    __slots__ = ()

    def __init__(self, options: Any) -> None:
        ConnectionCore.__init__(self, options)


class SyncDriver:
    """A driver without tasks: records writes and asks."""

    def __init__(self, core: ConnectionCore) -> None:
        self.core = core
        self.written = bytearray()
        self.asked: list[Any] = []
        core._writer = self
        core._can_write = True
        core._clock = lambda: 100.0

    def write(self, data: bytes) -> None:
        self.written += data

    def addresses(self) -> tuple[Any, Any]:
        return ("192.0.2.1", 40000), ("192.0.2.2", 80)

    def close_socket(self) -> None:
        self.asked.append("close_socket")

    def abort(self) -> None:
        self.core._socket_closed = True
        self.asked.append("abort")

    def pause_reading(self) -> None:
        self.asked.append("pause_reading")

    def resume_reading(self) -> None:
        self.asked.append("resume_reading")

    def wake(self) -> None:
        pass

    def wake_at(self, deadline: float) -> None:
        self.asked.append(("wake_at", deadline))

    def cancel_timer(self) -> None:
        self.asked.append("cancel_timer")

    def flush_soon(self) -> None:
        self.asked.append("flush_soon")
        self.core._flush()


def serve(
    data: bytes, cuts: list[int], script: list[str], steady: bool, limit: int, idle: bool, read: str = "default"
) -> dict[str, Any]:
    """Feed ``data`` in pieces to a core serving the WebSocket module; what came out of it.

    ``steady``: each piece as the asyncio driver hands it over (the steady path when the core is
    steady, with ``read`` as its `steady_step`); else each piece to the general path.
    """
    log: list[Any] = []
    group = f"steady-{next(_groups)}"
    websocket: list[tuple[str, Any]] = [
        ("handler_module", ScriptHandler),
        ("handler_options", {"script": script, "log": log, "group": group}),
        ("max_message_size", limit),
        ("ping_interval", None),
        ("idle_timeout", 30 if idle else None),
    ]
    options = parse_options(
        [
            ("port", 0),
            ("worker_options", [("initial_module", "websocket"), ("protocol_modules", [("websocket", websocket)])]),
        ]
    )
    core = BareWorker(options.worker)
    driver = SyncDriver(core)
    core._attach(driver)  # type: ignore[arg-type]
    core._feed(core._module.start(b"", {}))
    saved = _core.steady_step
    _core.steady_step = READS[read]
    try:
        taken = _feed_pieces(core, data, cuts, steady)
    finally:
        _core.steady_step = saved
    core._on_eof()
    for member in groups.members(group):  # a bare core has no worker supervisor to take it out of its group
        groups.leave(group, member)
    module: Any = core._module
    return {
        "written": bytes(driver.written),
        "asked": driver.asked,
        "told": log,
        "counts": (core._bytes_in, core._bytes_out, core._messages_in, module.messages_out, core._handler_errors),
        "ends": (core._stopped, core._socket_closed, module.closed_by, module.state, core._close),
        "timers": dict(core._timers),
        "taken": taken,
    }


def _feed_pieces(core: ConnectionCore, data: bytes, cuts: list[int], steady: bool) -> int:
    """Hand ``data`` to ``core`` cut at ``cuts``; how many pieces took the steady path."""
    taken = start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut <= start:
            continue
        piece = data[start:cut]
        start = cut
        if steady:
            buffer = bytearray(piece) + bytearray(b"\x81")  # more in the buffer than was read
            view = memoryview(buffer)
            if core._steady_ok:  # the flag kept from an earlier check must still be right
                core._steady_ok = False
                assert core._steady_check()
            if core._steady_check():
                core._steady_read(view, len(piece))
                taken += 1
            else:
                core._input("data", bytes(view[: len(piece)]))
            buffer[:] = b"\xaa" * len(buffer)  # the driver's buffer is reused: nothing may keep it
        else:
            core._input("data", piece)
    return taken


def _lines(records: list[logging.LogRecord]) -> list[str]:
    """The first line of each record, without connection numbers and object addresses."""
    lines = (record.getMessage().splitlines()[0] for record in records)
    return [re.sub(r" at 0x[0-9a-f]+|(?:conn|Worker) \d+", "", line) for line in lines]


@settings(
    max_examples=int(os.environ.get("PYWSSERVER_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    frames=client_frames(),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    script=st.lists(st.sampled_from(RESULTS), max_size=6),
    limit=st.sampled_from([64, 1 << 20]),
    idle=st.booleans(),
    read=st.sampled_from(sorted(READS)),
)
def test_the_steady_path_does_what_the_general_path_does(
    frames: list[Any],
    cuts: list[int],
    script: list[str],
    limit: int,
    idle: bool,
    read: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = encode(frames)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pywsserver"):
        general = serve(data, cuts, script, steady=False, limit=limit, idle=idle)
        general_logs = _lines(caplog.records)
        caplog.clear()
        steady = serve(data, cuts, script, steady=True, limit=limit, idle=idle, read=read)
        steady_logs = _lines(caplog.records)
    del general["taken"], steady["taken"]
    assert steady == general
    assert steady_logs == general_logs


@pytest.mark.parametrize("read", sorted(READS))
def test_echoes_of_whole_frames_take_the_steady_path(read: str) -> None:
    """The common case does take the shortcut (else the property above would test nothing)."""
    mask = b"\x01\x02\x03\x04"
    frame = bytes((0x81, 0x80 | 5)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
    data = frame * 3
    result = serve(data, [11], ["echo"], steady=True, limit=1 << 20, idle=True, read=read)
    assert result["taken"] == 2  # one frame, then two
    assert result["written"].startswith(b"\x81\x05hello" * 3)
    assert [entry[1] for entry in result["told"][:3]] == ["hello"] * 3
