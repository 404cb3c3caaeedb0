"""Several server processes share a port under a supervising parent (``processes`` / ``--processes``)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest

from pywsserver import OptionError
from pywsserver._options import parse_options
from pywsserver.testing import Client

from .recorder import server_options

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="several processes need fork"),
]


async def read_until(
    process: anyio.abc.Process, pattern: bytes, log: list[bytes], timeout: float = 20
) -> re.Match[bytes]:
    assert process.stdout is not None
    with anyio.fail_after(timeout):
        while not (found := re.search(pattern, b"".join(log))):
            log.append(await process.stdout.receive())
    return found


async def pids_serving(port: int, count: int) -> set[str]:
    pids = set()
    for _ in range(count):
        async with await Client.connect(port) as client:
            await client.send("who")
            pids.add(str(await client.receive()))
    return pids


@contextlib.asynccontextmanager
async def two_server_processes() -> AsyncIterator[tuple[anyio.abc.Process, list[bytes], int, set[str]]]:
    """The command line with ``--processes 2``, once both serve: its process, output, port and the children's pids."""
    command = [sys.executable, "-m", "pywsserver", "--port", "0", "--processes", "2", "--handler", "tests.pid_handler"]
    process = await anyio.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log: list[bytes] = []
    try:
        port = int((await read_until(process, rb"2 server processes share port (\d+)", log)).group(1))
        await read_until(process, rb"(?s)serving on.*serving on", log)
        pids = await pids_serving(port, 40)
        assert len(pids) == 2, pids  # the kernel spread 40 connections over both
        yield process, log, port, pids
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_processes_share_the_port_and_a_killed_one_is_restarted() -> None:
    async with two_server_processes() as (process, log, port, pids):
        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)
        await read_until(process, rb"was killed by SIGKILL; restarting it", log)
        await read_until(process, rb"(?s)restarting it.*serving on", log)
        after = await pids_serving(port, 40)
        assert str(victim) not in after
        assert len(after) == 2, after
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            code = await process.wait()
        assert code == 0, b"".join(log).decode()
        for pid in after:  # every child is gone
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
    reason="the link uses Linux's parent-death signal",
)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_processes_do_not_outlive_a_killed_parent() -> None:
    async with two_server_processes() as (process, _, _, pids):
        # A pidfd becomes readable when its process ends, child of ours or not.
        exits = [os.pidfd_open(int(pid)) for pid in pids]
        try:
            process.kill()  # SIGKILL: the parent cannot stop its children itself
            await process.wait()
            with anyio.fail_after(20):
                for fd in exits:
                    await anyio.wait_readable(fd)
        finally:
            for fd in exits:
                os.close(fd)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_processes_dying_faster_than_the_intensity_allows_make_the_parent_give_up() -> None:
    command = [
        sys.executable,
        "-m",
        "pywsserver",
        "--port",
        "0",
        "--processes",
        "2",
        "--handler",
        "tests.crash_on_start",
    ]
    result = await anyio.run_process(command, cwd=ROOT, check=False)
    log = result.stderr.decode()
    assert result.returncode == 1, log
    assert "giving up: server process" in log
    assert "the server gave up" in log


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"processes": 0}, "processes"),
        ({"processes": 2, "unix_path": "/tmp/x.sock"}, "processes"),
        ({"reuse_port": "yes"}, "reuse_port"),
    ],
)
def test_bad_process_options_fail_with_their_path(extra: dict[str, object], path: str) -> None:
    with pytest.raises(OptionError) as raised:
        parse_options(server_options(**extra))
    assert raised.value.path == path
