"""Several server processes sharing one port, under a parent that supervises them the OTP way.

Python serves on one core per process. With the ``processes`` option, `run`
becomes this parent: it reserves the port (bound, never listening), forks ``processes`` children
that each run the whole server tree with ``SO_REUSEPORT`` on that port (the kernel spreads new
connections across them), and then only watches:

* a child that exits while the parent is not stopping is restarted (forked again), unless more than
  ``intensity`` restarts happened within ``period`` seconds: then the parent stops the others and
  `run` raises `RestartIntensityExceeded`, as a supervisor
  would;
* SIGINT or SIGTERM stops the parent: every child gets SIGTERM and stops gracefully (close 1001,
  ``drain_timeout``); a child still running ``drain_timeout`` plus 5 seconds later is killed;
* the children are linked to the parent: if it dies without stopping them (SIGKILL, a crash), the
  kernel sends each SIGTERM (on Linux), so no server process outlives its supervisor;
* with the ``cluster`` option the children are the nodes of one cluster, named ``<node>-<slot>``
  (the parent takes no part in it: Redis is the broker); without it, the first broadcast of each
  child warns that broadcasts stay within that process.

The parent runs no event loop and starts no thread, so forking is safe; the children get the parsed
options (handler classes, SSL contexts and all) by inheritance, nothing is pickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from ._options import ServerOptions
from .supervision import RestartIntensityExceeded

__all__ = ["run_processes"]

logger = logging.getLogger("pywsserver.processes")

#: Restarts allowed within ``PERIOD`` seconds before the parent gives up (OTP's intensity and period).
INTENSITY = 5
PERIOD = 10.0


class _Stop(Exception):
    """Raised by the signal handler to interrupt the parent's wait."""


def _reserve_port(options: ServerOptions) -> tuple[socket.socket, int]:
    """Bind (without listening) a socket with SO_REUSEPORT: fixes the port, takes no connection."""
    host = options.host
    family = socket.AF_INET6 if host is not None and ":" in host else socket.AF_INET
    address = host if host not in (None, "") else ("::" if family == socket.AF_INET6 else "0.0.0.0")
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((address, options.port))
    except OSError:
        reserved.close()
        raise
    return reserved, reserved.getsockname()[1]


def run_processes(options: ServerOptions, serve: Callable[[ServerOptions], Any]) -> None:
    """Fork ``options.processes`` children running ``serve(child_options)`` and supervise them."""
    from ._errors import ServerStartError

    try:
        reserved, port = _reserve_port(options)
    except OSError as error:
        raise ServerStartError(f"cannot listen on {options.host or '*'}:{options.port}: {error}") from error
    child_options = attrs.evolve(options, port=port, reuse_port=True, processes=1)
    cluster = options.cluster
    if cluster is not None:
        # One cluster: each process is a node of it, named after the slot it fills.
        base = cluster.node or f"{socket.gethostname()}-{os.getpid()}"
        logger.info(
            "the %d server processes are nodes %s-0 to %s-%d of one cluster",
            options.processes,
            base,
            base,
            options.processes - 1,
        )
    metrics_directory = _metrics_directory(options)
    children: dict[int, int] = {}  # pid -> slot
    restarts: deque[float] = deque()
    stopping = False

    parent = os.getpid()

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                reserved.close()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _die_with(parent)
                serve(_for_slot(child_options, slot, options.processes))
                code = 0
            except BaseException:
                logger.exception("server process %d (slot %d) failed", os.getpid(), slot)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot

    def on_signal(number: int, frame: Any) -> None:
        raise _Stop(signal.Signals(number).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    gave_up: tuple[int, str] | None = None
    try:
        try:
            for slot in range(options.processes):
                spawn(slot)
            logger.info("%d server processes share port %d (parent %d)", options.processes, port, os.getpid())
            while children:
                pid, status = os.wait()
                if pid not in children:
                    continue
                slot = children.pop(pid)
                reason = _describe(status)
                _metrics_process_dead(metrics_directory, pid)
                now = time.monotonic()
                restarts.append(now)
                while restarts and now - restarts[0] > PERIOD:
                    restarts.popleft()
                if len(restarts) > INTENSITY:
                    gave_up = (slot, reason)
                    logger.error(
                        "giving up: server process %d (slot %d) %s, the %d-th exit within %gs",
                        pid,
                        slot,
                        reason,
                        len(restarts),
                        PERIOD,
                    )
                    break
                logger.error("server process %d (slot %d) %s; restarting it", pid, slot, reason)
                spawn(slot)
        except _Stop as received:
            logger.info("received %s: stopping %d server processes", received, len(children))
        stopping = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not leave orphans behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_children(children, options.drain_timeout + 5)
    finally:
        if not stopping:  # an unexpected error in the parent itself
            _stop_children(children, options.drain_timeout + 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
        if metrics_directory is not None and metrics_directory[1]:
            os.environ.pop(_MULTIPROCESS_DIRECTORY, None)
            shutil.rmtree(metrics_directory[0], ignore_errors=True)
    if gave_up is not None:
        slot, reason = gave_up
        raise RestartIntensityExceeded("of server processes", f"server process {slot}", ChildProcessError(reason))


_MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode reads it


def _metrics_directory(options: ServerOptions) -> tuple[str, bool] | None:
    """With metrics on: the directory where every process writes its figures, and whether it is ours.

    The children inherit it through the environment (prometheus-client's
    multiprocess mode); a directory the user gave is used and kept, one made
    here is removed when the parent ends.
    """
    if not options.metrics:
        return None
    given = os.environ.get(_MULTIPROCESS_DIRECTORY)
    if given:
        return given, False
    directory = tempfile.mkdtemp(prefix="pywsserver-metrics-")
    os.environ[_MULTIPROCESS_DIRECTORY] = directory
    return directory, True


def _metrics_process_dead(directory: tuple[str, bool] | None, pid: int) -> None:
    """A server process ended: its live gauges (connections open, event-loop lag) leave the scrape."""
    if directory is None:
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, directory[0])  # type: ignore[no-untyped-call]
    except OSError as error:
        logger.warning("cannot remove the metrics of server process %d: %s", pid, error)


def _for_slot(options: ServerOptions, slot: int, processes: int) -> ServerOptions:
    """The options of the process in ``slot``: its own cluster node name, or the warning flag without a cluster."""
    if options.cluster is None:
        from .cluster import _state

        _state.island_processes = processes  # the first broadcast warns that it stays in this process
        return options
    base = options.cluster.node or f"{socket.gethostname()}-{os.getppid()}"
    return attrs.evolve(options, cluster=attrs.evolve(options.cluster, node=f"{base}-{slot}"))


def _die_with(parent: int) -> None:
    """Link this child to its parent, as OTP links a process to its supervisor: if the parent dies
    without stopping it (killed with SIGKILL, say), the kernel sends this child SIGTERM (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl here: the child outlives a killed parent
        return
    if os.getppid() != parent:  # the parent died before the link was made
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _stop_children(children: dict[int, int], grace: float) -> None:
    """SIGTERM every child, wait up to ``grace`` seconds, then SIGKILL what is left."""
    # SIGCHLD is blocked while we wait for it, so an exit between a reap and the wait is not missed.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while children:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                children.pop(pid, None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            signal.sigtimedwait({signal.SIGCHLD}, remaining)  # the next exit, or the deadline
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    for pid in list(children):
        logger.warning("server process %d did not stop within %.0fs: killing it", pid, grace)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        children.pop(pid, None)
