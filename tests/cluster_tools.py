"""A real ``redis-server`` for the cluster tests, and cluster nodes as separate OS processes.

`running_redis` (the body of a fixture) starts ``redis-server`` on a free loopback port in a temporary
directory (no persistence) and stops it. Where it is not installed the tests skip, saying how to
install it; in CI (``CI=true``) a missing Redis fails the run instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "install it to run them: apt-get install redis-server (Debian, Ubuntu) or brew install redis (macOS)"


def _missing(what: str) -> None:
    message = f"the cluster tests need {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; .ci/run installs it", pytrace=False)
    pytest.skip(f"{message}: {INSTALL}" if what == "redis-server" else f"{message}: pip install -e '.[test]'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on a loopback port; `kill` and `start` again to test outages."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        command += ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()}")
            time.sleep(0.02)  # between two probes of the port (bounded by the deadline)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def running_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The body of a ``redis_server`` fixture: a started server, killed at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        _missing("the redis package")
    assert binary is not None
    server = RedisServer(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Node:
    """A cluster node running ``tests/cluster_node.py`` in its own process."""

    def __init__(self, process: anyio.abc.Process, name: str, port: int) -> None:
        self.process = process
        self.name = name
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


@contextlib.asynccontextmanager
async def node_process(redis_url: str, name: str, *extra: str) -> AsyncIterator[Node]:
    """Start a node and yield it once it serves; stop it (SIGTERM, then SIGKILL) at the end."""
    command = [sys.executable, "-m", "tests.cluster_node", redis_url, name, *extra]
    process = await anyio.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None)
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(20):
            while b"\n" not in line:
                line += await process.stdout.receive()
        assert line.startswith(b"READY "), line
        yield Node(process, name, int(line.split()[1]))
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()
