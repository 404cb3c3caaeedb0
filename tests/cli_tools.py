"""A server process for command-line tests: started, watched line by line, stopped, always reaped."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The ``pywsserver`` console script of this environment.
SCRIPT = Path(sys.executable).with_name("pywsserver")


class ServerProcess:
    """A process whose output (stdout and stderr together) is read line by line by a thread."""

    def __init__(self, command: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def log(self) -> str:
        """Everything read so far."""
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first output line matching ``pattern`` (read so far or to come), within ``timeout`` seconds."""
        for line in self.lines:
            if found := re.search(pattern, line):
                return found
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the process ended without printing {pattern!r}:\n{self.log}")
            self.lines.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.log}")

    def port(self) -> int:
        """The TCP port the server listens on (from its log)."""
        return int(self.wait_for(r"listening on \S*?:(\d+)").group(1))

    def signal(self, number: int = signal.SIGINT) -> None:
        """Send a signal."""
        self.process.send_signal(number)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the exit; the exit code and the whole output."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code, self.log


@contextmanager
def server_process(
    command: Sequence[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Run ``command``; kill it at the end if it is still running."""
    served = ServerProcess(command, cwd, env)
    try:
        yield served
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
        if served.process.stdout is not None:
            served.process.stdout.close()


def cli(*arguments: str) -> list[str]:
    """The command line ``python -m pywsserver ARGUMENTS``."""
    return [sys.executable, "-m", "pywsserver", *arguments]


def run_cli(
    *arguments: str, cwd: Path = ROOT, timeout: float = 60, script: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the command line to its end (for the ones that fail at start or print and exit)."""
    command = [str(SCRIPT), *arguments] if script else cli(*arguments)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
