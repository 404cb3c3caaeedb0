"""What going through Redis costs a node per broadcast: CPU time, and instructions under callgrind.

``python benchmarks/cluster_cost.py [N]`` runs one cluster node in this process and prints
``publish_us=... receive_us=...`` (CPU time of the node's own process, N broadcasts in a burst):

* publish: the CPU time per broadcast with the cluster (local delivery to an empty group, then the
  publish, batched as a burst is) minus the same broadcasts without it;
* receive: the CPU time per broadcast that arrives from another node (read from the subscription,
  decoded, handed to the group's delivery; the group has no member here, so the writes, the same as
  for a local broadcast, are not counted).

``python benchmarks/cluster_cost.py --instructions [N1 N2]`` counts instead the instructions of a node
under valgrind's callgrind (a figure that load does not move), one broadcast at a time as in the
``broadcast`` scenario, with one member (a client of the node) that must have each message before the
next is sent. The node runs twice per case, N1 and N2 rounds, and instructions per broadcast =
(total(N2) - total(N1)) / (N2 - N1), so that start-up and shutdown cancel out:

* local: no cluster; the member sends ``go:1:64`` and the node broadcasts it to its group;
* publish: the same with the cluster: the node also publishes the broadcast, reads Redis's reply
  and skips its own message when Redis sends it back (publish cost = publish - local);
* receive: the node gets the broadcasts from Redis (published by this script as another node would)
  and delivers them to its member (beside local: reading from Redis instead of from a client).

Both start their own ``redis-server`` on a free port unless ``BENCH_REDIS_URL`` names one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

import pywsserver
from pywsserver import broadcast

HERE = Path(__file__).resolve().parent


async def until(done: Any) -> None:
    """Poll (every 10 ms, so that waiting costs next to no CPU) until ``done()``; at most 60 s."""
    for _ in range(6000):
        if done():
            return
        await anyio.sleep(0.01)
    raise TimeoutError("the node did not get there in 60 s")


async def main(url: str, count: int) -> None:
    websocket = ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])])

    async def burst(node: object) -> float:
        started = time.process_time()
        for number in range(count):
            broadcast("nobody", "x" * 64)
            if number % 100 == 99:
                await anyio.lowlevel.checkpoint()  # the publisher takes what is queued, as between handler calls
        if node is not None:
            await until(lambda: node.stats.published >= count)  # type: ignore[attr-defined]
        return time.process_time() - started

    async with pywsserver.start_link([("port", 0), websocket]):
        plain = await burst(None)
    options = [("port", 0), ("cluster", [("url", url), ("node", "cost")]), websocket]
    async with pywsserver.start_link(options) as server:
        node = server.cluster
        assert node is not None
        with_cluster = await burst(node)
        before = node.stats.received
        started = time.process_time()
        # Another process publishes them, as another node would (its CPU is not this process's).
        await anyio.run_process([sys.executable, __file__, "--publish", url, str(count)])
        await until(lambda: node.stats.received - before >= count)
        receiving = time.process_time() - started
    print(
        f"publish_us={(with_cluster - plain) / count * 1e6:.1f} receive_us={receiving / count * 1e6:.1f} "
        f"broadcasts={count}"
    )


def elsewhere(group: bytes, payload: bytes) -> bytes:
    """A broadcast of ``payload`` to ``group`` from a node named "elsewhere", as the wire has it."""
    fields = (b"elsewhere", group, b"1013")
    return b"B\x01" + b"".join(len(f).to_bytes(4, "big") + f for f in fields) + payload


#: A broadcast of "b" * 64 to the group "bench".
ELSEWHERE = elsewhere(b"bench", b"b" * 64)


def publish(url: str, count: int) -> None:
    """Publish ``count`` broadcasts from a node named "elsewhere" to a group nobody here is in."""
    import redis

    message = elsewhere(b"nobody", b"x" * 64)
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for _ in range(count):
        pipe.publish("pywsserver:broadcast", message)
    pipe.execute()


# ------------------------------------------------------------------ instructions under callgrind


def serve(url: str | None) -> None:
    """The node measured: the benchmark's handler (members join "bench"), with a cluster when ``url``."""
    sys.path.insert(0, str(HERE))
    from servers import pywsserver_options, ready

    # No loop watchdog: its cost grows with the run's duration (long under valgrind), not with its broadcasts.
    options = [*pywsserver_options(0), ("loop_watchdog", None)]
    if url is not None:
        # Heartbeats far apart: their cost grows with the run's duration, not with its broadcasts.
        cluster = [("url", url), ("node", "cost"), ("heartbeat_interval", 600), ("node_timeout", 1200)]
        options.append(("cluster", cluster))

    async def run() -> None:
        async with pywsserver.start_link(options) as server:
            if server.cluster is not None:
                await until(lambda: server.cluster.connected)  # type: ignore[union-attr]
            ready(server.port)
            await anyio.sleep_forever()

    anyio.run(run)


def _redis_command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _rounds(port: int, count: int, url: str | None) -> None:
    """``count`` broadcasts one at a time: from the member's ``go`` or, with ``url``, published to Redis."""
    sys.path.insert(0, str(HERE))
    from instructions import _close, _connect, _masked_text, _receive_exactly

    member = _connect(port)
    publisher = None
    if url is None:
        request = _masked_text(b"go:1:64")
    else:
        host, _, redis_port = url.removeprefix("redis://").partition("/")[0].partition(":")
        publisher = socket.create_connection((host, int(redis_port)), timeout=60)
        request = _redis_command(b"PUBLISH", b"pywsserver:broadcast", ELSEWHERE)
    try:
        for _ in range(count):
            (publisher or member).sendall(request)
            _receive_exactly(member, 66)
            if publisher is not None:
                _receive_exactly(publisher, 4)  # ":1\r\n": one subscriber, the node
    finally:
        _close(member)
        if publisher is not None:
            publisher.close()


def count_instructions(case: str, url: str, count: int) -> int:
    """Total instructions of one run of the node for ``case`` with ``count`` rounds (start-up included)."""
    sys.path.insert(0, str(HERE))
    from instructions import callgrind_total, under_callgrind

    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        arguments = [__file__, "--serve", *([url] if case != "local" else [])]
        with under_callgrind(arguments, out, f"the {case} node") as port:
            _rounds(port, count, url if case == "receive" else None)
        return callgrind_total(out, f"the {case} node")


def instructions(url: str, first: int, second: int) -> None:
    figures = {}
    for case in ("local", "publish", "receive"):
        low = count_instructions(case, url, first)
        high = count_instructions(case, url, second)
        figures[case] = (high - low) / (second - first)
        print(f"{case:8} {figures[case]:,.0f} instructions per broadcast (one member)", flush=True)
    print(
        f"publish_cost={figures['publish'] - figures['local']:,.0f} "
        f"receive_vs_local={figures['receive'] - figures['local']:+,.0f} instructions per broadcast"
    )


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """``BENCH_REDIS_URL``, or a redis-server of this run's own."""
    if os.environ.get("BENCH_REDIS_URL"):
        yield os.environ["BENCH_REDIS_URL"]
        return
    sys.path.insert(0, str(HERE))
    from run import redis_server

    with redis_server() as url:
        yield url


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--publish"]:
        publish(arguments[1], int(arguments[2]))
    elif arguments[:1] == ["--serve"]:
        serve(arguments[1] if len(arguments) > 1 else None)
    elif arguments[:1] == ["--instructions"]:
        rounds = [int(value) for value in arguments[1:3]] or [200, 1200]
        with redis_url() as url:
            instructions(url, rounds[0], rounds[1])
    else:
        with redis_url() as url:
            anyio.run(main, url, int(arguments[0]) if arguments else 20000)
