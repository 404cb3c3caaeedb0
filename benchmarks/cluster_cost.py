"""What going through Redis costs a node per broadcast, in CPU time of the node's own process.

``BENCH_REDIS_URL=redis://... python benchmarks/cluster_cost.py [N]`` runs one cluster node in this
process and prints ``publish_us=... receive_us=...``:

* publish: the CPU time per broadcast with the cluster (local delivery to an empty group, then the
  publish, batched as a burst is) minus the same broadcasts without it;
* receive: the CPU time per broadcast that arrives from another node (read from the subscription,
  decoded, handed to the group's delivery; the group has no member here, so the writes, the same as
  for a local broadcast, are not counted).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel

import pywsserver
from pywsserver import broadcast


async def until(done: Any) -> None:
    """Poll (every 10 ms, so that waiting costs next to no CPU) until ``done()``; at most 60 s."""
    for _ in range(6000):
        if done():
            return
        await anyio.sleep(0.01)
    raise TimeoutError("the node did not get there in 60 s")


async def main(count: int) -> None:
    url = os.environ["BENCH_REDIS_URL"]
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


def publish(url: str, count: int) -> None:
    """Publish ``count`` broadcasts from a node named "elsewhere" to a group nobody here is in."""
    import redis

    fields = (b"elsewhere", b"nobody", b"1013")
    message = b"B\x01" + b"".join(len(f).to_bytes(4, "big") + f for f in fields) + b"x" * 64
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for _ in range(count):
        pipe.publish("pywsserver:broadcast", message)
    pipe.execute()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--publish"]:
        publish(sys.argv[2], int(sys.argv[3]))
    else:
        anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
