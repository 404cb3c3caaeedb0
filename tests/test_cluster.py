"""The cluster on Redis: nodes as separate OS processes on one real ``redis-server``.

Broadcast across nodes (each message exactly once, in order per sender), presence with expiry
(a SIGKILLed node leaves within ``node_timeout``), send to an address anywhere, names across nodes,
Redis killed and restarted while serving, and the start-up errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from websockets.asyncio.client import ClientConnection, connect

import pywsserver
from pywsserver import OptionError, ServerStartError, broadcast, cluster
from pywsserver._options import parse_options
from pywsserver.cluster import Address, ClusterStartError
from pywsserver.testing import serve_for_test

from .cluster_tools import Node, RedisServer, node_process, running_redis

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port in a temporary directory (skips, or fails in CI, without one)."""
    yield from running_redis(tmp_path)


#: Fast presence for the tests: a heartbeat every 0.2 s, gone 1 s after the last one.
FAST = ("heartbeat_interval=0.2", "node_timeout=1")


async def receive(client: ClientConnection, timeout: float = 10) -> str:
    with anyio.fail_after(timeout):
        message = await client.recv()
    assert isinstance(message, str)
    return message


async def ask(client: ClientConnection, command: str) -> str:
    await client.send(command)
    return await receive(client)


@contextlib.asynccontextmanager
async def nodes(redis: RedisServer, names: str, *extra: str) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        started: list[Node] = []
        for name in names:
            started.append(await stack.enter_async_context(node_process(redis.url, name, *extra)))
        yield started


async def until(check: Any, what: str, attempts: int = 100, pause: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something true (a bounded number of times)."""
    for _ in range(attempts):
        result = await check()
        if result:
            return result
        await anyio.sleep(pause)  # the pause between two polls of the condition, not a wait standing in for it
    raise AssertionError(f"never happened: {what}")


def cluster_options(url: str, **extra: Any) -> list[tuple[str, Any]]:
    return [("url", url), *extra.items()]


# ------------------------------------------------------------------ options and start


def test_cluster_option_errors_name_the_option() -> None:
    websocket = ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])])
    cases = [
        ([("node", "a")], "cluster.url: required"),
        ([("url", "http://x")], "cluster.url: expected a redis://"),
        ([("url", "redis://x"), ("node", "a/b")], "cluster.node: expected 1 to 100 characters"),
        ([("url", "redis://x"), ("heartbeat_interval", 3.0)], "cluster.node_timeout: expected at least twice"),
        ([("url", "redis://x"), ("publish_queue", 0)], "cluster.publish_queue: expected an int >= 1"),
        ([("url", "redis://x"), ("publish_queue_bytes", 0)], "cluster.publish_queue_bytes: expected an int >= 1"),
        ([("url", "redis://x"), ("colour", "red")], "cluster.colour: unknown option"),
    ]
    for raw, message in cases:
        with pytest.raises(OptionError) as caught:
            parse_options([("cluster", raw), websocket])
        assert str(caught.value).startswith(message), caught.value
    parsed = parse_options([("cluster", "redis://127.0.0.1:1/0"), websocket])
    assert parsed.cluster is not None and parsed.cluster.url == "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_cluster_on_trio_fails_at_once_naming_the_option() -> None:
    with pytest.raises(OptionError, match=r"^cluster: the Redis client \(redis.asyncio\) runs on asyncio only"):
        async with serve_for_test("pywsserver.echo", cluster=[("url", "redis://127.0.0.1:1/0")]):
            pass


def test_run_on_trio_with_a_cluster_fails_before_starting() -> None:
    options = [
        ("cluster", [("url", "redis://127.0.0.1:1/0")]),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])]),
    ]
    with pytest.raises(OptionError, match=r"^cluster: .*asyncio only"):
        pywsserver.run(options, backend="trio")


@asyncio_only
async def test_redis_unreachable_at_start_is_a_clear_error(redis_server: RedisServer) -> None:
    redis_server.kill()
    url = redis_server.url.replace("redis://", "redis://user:secret@")
    with pytest.raises(ServerStartError) as caught:
        async with serve_for_test("pywsserver.echo", cluster=cluster_options(url, connect_timeout=2.0)):
            pass
    assert isinstance(caught.value, ClusterStartError)
    message = str(caught.value)
    assert message.startswith("cluster.url: cannot use the Redis server at redis://user:***@127.0.0.1:")
    assert "secret" not in message and "cluster.wait_for_redis" in message


@asyncio_only
async def test_wait_for_redis_starts_without_it_and_joins_when_it_comes(redis_server: RedisServer) -> None:
    redis_server.kill()
    options = cluster_options(redis_server.url, wait_for_redis=True, max_backoff=0.2, node="solo")
    async with serve_for_test("pywsserver.echo", cluster=options) as server:
        node = server.cluster
        assert node is not None and not node.connected
        assert broadcast("nobody", "lost").published is False  # fails at once, counted
        assert node.stats.publish_failed == 1
        with pytest.raises(cluster.ClusterUnavailable):
            await cluster.nodes()
        redis_server.start()

        async def joined() -> bool:
            return node.connected

        await until(joined, "the node connects once Redis is up")
        assert broadcast("nobody", "sent").published is True
        assert await cluster.nodes() == ["solo"]
    assert cluster.node() is None  # stopped: this process is no node any more


@asyncio_only
async def test_one_node_in_process_broadcast_send_and_presence(redis_server: RedisServer) -> None:
    options = cluster_options(redis_server.url, node="here")
    async with serve_for_test("tests.cluster_node:Handler", cluster=options) as server:
        assert cluster.node() == "here"
        async with connect(f"ws://127.0.0.1:{server.port}/") as client:
            address = Address.parse((await ask(client, "addr")).removeprefix("addr:"))
            assert address.node == "here" and str(address) == f"here/{address.run}/{address.connection_id}"
            result = broadcast("chat", "to all")
            assert (result.delivered, result.published) == (1, True)
            assert await receive(client) == "to all"
            await cluster.send(address, "to one")
            await cluster.send(str(address), "to one again")
            assert [await receive(client), await receive(client)] == ["to one", "to one again"]

            async def counted() -> bool:
                return await cluster.presence("chat") == {"here": {"chat": 1}}

            await until(counted, "presence counts the member")
            assert await cluster.count("chat") == 1
        stale = Address("here", "0000", address.connection_id)
        with pytest.raises(pywsserver.ConnectionClosed, match="restarted"):
            await cluster.send(stale, "x")


@asyncio_only
async def test_a_second_node_in_one_process_is_refused(redis_server: RedisServer) -> None:
    async with serve_for_test("pywsserver.echo", cluster=cluster_options(redis_server.url, node="one")):
        with pytest.raises(ServerStartError, match="already runs the cluster node 'one'"):
            async with serve_for_test("pywsserver.echo", cluster=cluster_options(redis_server.url, node="two")):
                pass


# ------------------------------------------------------------------ nodes as processes


@asyncio_only
async def test_chat_across_three_nodes_each_message_once_and_in_order(redis_server: RedisServer) -> None:
    per_sender = 40
    async with nodes(redis_server, "ABC") as started, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(node.url)) for node in started for _ in range(2)]
        expected = len(clients) * per_sender
        received: list[list[str]] = [[] for _ in clients]

        async def talk(index: int) -> None:
            for number in range(per_sender):
                await clients[index].send(f"say:{index}:{number}")

        async def listen(index: int) -> None:
            while len(received[index]) < expected:
                received[index].append(await receive(clients[index], timeout=20))

        async with anyio.create_task_group() as group:
            for index in range(len(clients)):
                group.start_soon(listen, index)
                group.start_soon(talk, index)
        for messages in received:
            by_sender: dict[str, list[int]] = {}
            for message in messages:
                sender, number = message.split(":")
                by_sender.setdefault(sender, []).append(int(number))
            assert by_sender == {str(i): list(range(per_sender)) for i in range(len(clients))}
        with contextlib.suppress(TimeoutError):  # and nothing more arrives
            extra = await receive(clients[0], timeout=0.3)
            raise AssertionError(f"a message arrived twice or from nowhere: {extra!r}")


@asyncio_only
async def test_a_killed_node_leaves_presence_within_node_timeout(redis_server: RedisServer) -> None:
    async with nodes(redis_server, "ABC", *FAST) as (a, _, c), connect(a.url) as watcher, connect(c.url):

        async def everyone() -> Any:
            found = json.loads(await ask(watcher, "presence"))
            return found if set(found) == {"A", "C"} else None  # B has no members

        await until(everyone, "the members of A and C are counted")
        assert json.loads(await ask(watcher, "nodes")) == ["A", "B", "C"]
        c.process.kill()
        await c.process.wait()
        # node_timeout is 1 s: the node must be gone 1 s after its last heartbeat; the poll below
        # allows 2 s more for the scheduling of a loaded machine, and no more.
        with anyio.fail_after(3.0):
            for _ in range(1000):
                if "C" not in json.loads(await ask(watcher, "nodes")):
                    break
                await anyio.sleep(0.05)  # between two polls (bounded by fail_after above)
        assert json.loads(await ask(watcher, "presence")) == {"A": {"chat": 1}}
        assert json.loads(await ask(watcher, "count")) == 1


@asyncio_only
async def test_send_to_an_address_on_another_node_and_a_clear_answer_when_gone(redis_server: RedisServer) -> None:
    async with nodes(redis_server, "AB", *FAST) as (a, b), connect(b.url) as sender:
        async with connect(a.url) as target, connect(a.url) as neighbour:
            address = (await ask(target, "addr")).removeprefix("addr:")
            assert address.startswith("A/")
            assert await ask(sender, f"send:{address} across") == "sent"
            assert await receive(target) == "across"
            assert await ask(neighbour, f"send:{address} beside") == "sent"  # the same node: no Redis
            assert await receive(target) == "beside"
        # the connection closed: its node answers that it is gone
        answer = await ask(sender, f"send:{address} late")
        assert answer == f"error:ConnectionClosed: connection {address} is gone"
        a.process.kill()
        await a.process.wait()
        # the node is dead: nobody reads its channel, the answer comes at once
        assert await ask(sender, f"send:{address} later") == f"error:ConnectionClosed: connection {address} is gone"
        assert (await ask(sender, "send:nonsense x")).startswith("error:ValueError: not a connection address")


@asyncio_only
async def test_names_across_nodes_first_claim_wins_and_casts_reach_the_holder(redis_server: RedisServer) -> None:
    async with nodes(redis_server, "ABC", *FAST) as (a, b, c):
        async with connect(a.url) as on_a, connect(b.url) as on_b, connect(c.url) as on_c:
            assert await ask(on_a, "register:room") == "registered"
            assert await ask(on_a, "register:room") == "registered"  # again, by its holder: fine
            assert await ask(on_b, "register:room") == (
                "error:NameRegisteredElsewhere: the name 'room' is already registered on node 'A'"
            )
            assert await ask(on_c, "whereis:room") == "whereis:A"
            await on_c.send("cast:room hello")
            # the room on A broadcasts to every node's members (the answer and the broadcast race to C)
            assert {await receive(on_c), await receive(on_c)} == {"cast", "room@A: hello"}
            assert [await receive(client) for client in (on_a, on_b)] == ["room@A: hello"] * 2
            assert (await ask(on_c, "cast:nobody hi")) == "error:NotRunning: no node holds the name 'nobody'"
        # A stops cleanly: it releases the name at once, and B can take it
        a.process.terminate()
        await a.process.wait()
        async with connect(b.url) as on_b:
            assert await ask(on_b, "whereis:room") == "whereis:None"
            assert await ask(on_b, "register:room") == "registered"
            await on_b.send("cast:room again")
            assert {await receive(on_b), await receive(on_b)} == {"cast", "room@B: again"}


@asyncio_only
async def test_redis_killed_and_restarted_local_goes_on_and_the_cluster_resumes(redis_server: RedisServer) -> None:
    extra = (*FAST, "max_backoff=0.3")
    async with nodes(redis_server, "AB", *extra) as (a, b), connect(a.url) as on_a, connect(b.url) as on_b:
        await on_a.send("sayr:before")
        assert [await receive(on_a), await receive(on_a)] == ["before", "result:1 True"]
        assert await receive(on_b) == "before"
        redis_server.kill()
        # A finds its link gone; meanwhile its local members keep getting its broadcasts at once
        for number in range(100):
            await on_a.send(f"sayr:down-{number}")
            assert await receive(on_a) == f"down-{number}"
            if await receive(on_a) == "result:1 False":
                break
            await anyio.sleep(0.05)  # paced sending while Redis is down: polls until the node sees it gone
        else:
            raise AssertionError("the publishes never failed while Redis was down")
        stats = json.loads(await ask(on_a, "stats"))
        assert stats["publish_failed"] >= 1 and stats["link_failures"] >= 1
        assert (await ask(on_a, "nodes")).startswith("error:ClusterUnavailable")
        redis_server.start()
        # Both nodes reconnect and subscribe again: a message from A reaches B again. What A said
        # while Redis was down is lost (at most once); B may have got the first "down" ones only.
        for number in range(200):
            await on_a.send(f"say:after-{number}")
            assert await receive(on_a) == f"after-{number}"
            with contextlib.suppress(TimeoutError):
                while (message := await receive(on_b, timeout=0.1)).startswith("down-"):
                    pass
                assert message == f"after-{number}", message
                break
        else:
            raise AssertionError("B never got A's messages again")
        stats = json.loads(await ask(on_a, "stats"))
        assert stats["connections"] >= 2 and stats["published"] >= 2
        await on_a.send("say:last")
        assert await receive(on_b) == "last"


@asyncio_only
async def test_publish_failures_are_logged_at_most_once_per_interval(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    options = cluster_options(redis_server.url, max_backoff=0.2, log_interval=60.0, node="quiet")
    async with serve_for_test("pywsserver.echo", cluster=options) as server:
        node = server.cluster
        assert node is not None
        redis_server.kill()

        async def down() -> bool:
            return not node.connected

        await until(down, "the node sees Redis gone")
        with caplog.at_level(logging.WARNING, logger="pywsserver.cluster"):
            results = [broadcast("g", f"m{i}").published for i in range(50)]
        assert results == [False] * 50
        assert node.stats.publish_failed >= 50
        lines = [r for r in caplog.records if "publishes fail" in r.getMessage()]
        assert len(lines) <= 1


# ------------------------------------------------------------------ processes


@contextlib.asynccontextmanager
async def command_line(*arguments: str) -> AsyncIterator[tuple[Any, list[bytes], int]]:
    """``python -m pywsserver --processes 2 ...`` once both processes serve: process, output, port."""
    import subprocess
    import sys

    from .test_processes import ROOT, read_until

    command = [sys.executable, "-m", "pywsserver", "--port", "0", "--processes", "2", *arguments]
    process = await anyio.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log: list[bytes] = []
    try:
        port = int((await read_until(process, rb"2 server processes share port (\d+)", log)).group(1))
        await read_until(process, rb"(?s)serving on.*serving on", log)
        yield process, log, port
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(15):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()


async def one_client_per_process(port: int, stack: contextlib.AsyncExitStack) -> dict[str, ClientConnection]:
    """Connect until a client is on each of the two processes (the kernel spreads connections)."""
    by_node: dict[str, ClientConnection] = {}
    for _ in range(60):
        client = await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}/"))
        node = (await ask(client, "addr")).removeprefix("addr:").split("/")[0]
        by_node.setdefault(node, client)
        if len(by_node) == 2:
            return by_node
    raise AssertionError(f"60 connections all went to {list(by_node)}")


@asyncio_only
async def test_processes_with_a_cluster_url_make_one_cluster(redis_server: RedisServer) -> None:
    arguments = ("--handler", "tests.cluster_node:Handler", "--cluster-url", redis_server.url)
    async with command_line(*arguments) as (_, log, port), contextlib.AsyncExitStack() as stack:
        by_node = await one_client_per_process(port, stack)
        first, second = sorted(by_node)
        assert first.endswith("-0") and second.endswith("-1") and first[:-2] == second[:-2]
        assert json.loads(await ask(by_node[first], "nodes")) == [first, second]
        await by_node[first].send("say:from the first process")
        assert await receive(by_node[second]) == "from the first process"
        await by_node[second].send("say:from the second")
        assert await receive(by_node[first]) == "from the first process"
        assert await receive(by_node[first]) == "from the second"
        assert b"of one cluster" in b"".join(log)


@asyncio_only
async def test_processes_without_a_cluster_warn_that_broadcasts_stay_in_each() -> None:
    from .test_processes import read_until

    async with (
        command_line("--handler", "tests.cluster_node:Handler") as (process, log, port),
        connect(f"ws://127.0.0.1:{port}/") as client,
    ):
        await client.send("say:alone")
        assert await receive(client) == "alone"
        await read_until(process, rb"broadcasts stay within this process: 2 server processes", log)


@asyncio_only
async def test_the_chat_example_across_two_processes_with_a_cluster(redis_server: RedisServer) -> None:
    import subprocess
    import sys

    from .cluster_tools import ROOT, free_port
    from .test_processes import read_until

    async def discard(output: Any) -> None:
        async for _ in output:  # the processes log on: read it, so that a full pipe never stalls them
            pass

    port = free_port()
    command = [sys.executable, "examples/chat.py", "--port", str(port), "--processes", "2"]
    command += ["--cluster-url", redis_server.url]
    process = await anyio.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Ready when both processes have joined the cluster: the cluster is the server's last child,
        # started once the server listens (a client served before its process joined would miss the
        # others' messages). The bound is for a machine busy with other work.
        await read_until(process, rb"(?s)joined the cluster.*joined the cluster", [], timeout=60)
        async with anyio.create_task_group() as reading, contextlib.AsyncExitStack() as stack:
            reading.start_soon(discard, process.stdout)
            clients: list[ClientConnection] = []
            for number in range(10):
                url = f"ws://127.0.0.1:{port}/ws?name=c{number}"
                clients.append(await stack.enter_async_context(connect(url)))
            # Ten clients spread by the kernel over the two processes (all on one: 1 chance in 512);
            # each one's message reaches all ten only through the cluster.
            for number, client in enumerate(clients):
                await client.send(f"hello from {number}")
                for other in clients:
                    said = None
                    while said is None:  # skip the news of who joined (from every process)
                        event = json.loads(await receive(other))
                        said = event if event["type"] == "said" else None
                    assert said == {"type": "said", "who": f"c{number}", "text": f"hello from {number}"}
            reading.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            with anyio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


def test_the_reconnect_schedule_never_exceeds_the_cluster_supervisors_intensity() -> None:
    from pywsserver.cluster._node import PERIOD, backoff, intensity_for

    for maximum in (0.01, 0.3, 1.0, 5.0, 30.0):
        limit = intensity_for(maximum)
        times, now = [], 0.0
        for failures in range(1, 2000):  # an outage of any length: the restarts a long one makes
            now += backoff(failures, maximum)
            times.append(now)
        worst = max(sum(1 for t in times if start <= t < start + PERIOD) for start in times)
        assert worst < limit, (maximum, worst, limit)


@asyncio_only
async def test_malformed_messages_on_the_channels_are_counted_and_dropped(redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    async with serve_for_test("tests.cluster_node:Handler", cluster=cluster_options(redis_server.url)) as server:
        node = server.cluster
        assert node is not None
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            for garbage in (b"", b"B", b"B\x00\xff\xff\xff\xff", b"Zzz", b"S\x00" + b"\x00\x00\x00\x01x"):
                await client.publish("pywsserver:broadcast", garbage)
                await client.publish(f"pywsserver:node:{node.name}", garbage)

            async def counted() -> bool:
                return node.stats.malformed == 10

            await until(counted, "every malformed message counted")
            async with connect(f"ws://127.0.0.1:{server.port}/") as client_ws:  # the node serves on
                assert (await ask(client_ws, "nodes")) == json.dumps([node.name])
        finally:
            await client.aclose()


async def subscribed(url: str) -> Any:
    """A redis-py subscription to the cluster's broadcast channel, as another node's would be."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe("pywsserver:broadcast")
    return client, pubsub


async def broadcasts_seen(pubsub: Any, count: int) -> list[bytes]:
    """The data of the next ``count`` broadcasts on the channel."""
    from pywsserver.cluster import _wire

    seen: list[bytes] = []
    with anyio.fail_after(20):
        while len(seen) < count:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                seen.append(_wire.decode(message["data"], 3)[3])
    return seen


@asyncio_only
async def test_a_burst_of_publishes_leaves_in_order_and_each_is_counted(redis_server: RedisServer) -> None:
    client, pubsub = await subscribed(redis_server.url)
    try:
        async with serve_for_test("pywsserver.echo", cluster=cluster_options(redis_server.url, node="n")) as server:
            node = server.cluster
            assert node is not None
            sent = [f"m{number:03d}".encode() for number in range(300)]
            # One message alone (the link idle), then bursts made in one step each (held, one write).
            assert broadcast("g", sent[0]).published is True
            assert await broadcasts_seen(pubsub, 1) == sent[:1]
            for start in range(1, 300, 100):
                assert all(broadcast("g", data).published for data in sent[start : start + 100])
                await anyio.lowlevel.checkpoint()
            assert await broadcasts_seen(pubsub, 299) == sent[1:]

            async def all_answered() -> bool:
                return node.stats.published == 300

            await until(all_answered, "a reply read for every publish")
            assert node.stats.publish_failed == 0
    finally:
        await pubsub.aclose()
        await client.aclose()


@asyncio_only
async def test_publishes_awaiting_their_reply_are_bounded_by_publish_queue(redis_server: RedisServer) -> None:
    client, pubsub = await subscribed(redis_server.url)
    options = cluster_options(redis_server.url, node="bounded", publish_queue=5)
    try:
        async with serve_for_test("pywsserver.echo", cluster=options) as server:
            node = server.cluster
            assert node is not None
            await client.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # Redis slower than the broadcasts
            results = [broadcast("g", f"early{number}".encode()).published for number in range(5)]

            async def written() -> bool:
                return node.stats.written == 5

            await until(written, "the five written")  # the first at once, the other four at the step's end
            assert node.stats.published == 0  # Redis is paused: the five await their replies
            results += [broadcast("g", f"late{number}".encode()).published for number in range(3)]
            assert results == [True] * 5 + [False] * 3
            assert node.stats.written == 5
            assert node.stats.publish_failed == 3
            seen = await broadcasts_seen(pubsub, 5)  # once Redis goes on: the five, in order, and no more
            assert seen == [f"early{number}".encode() for number in range(5)]

            async def answered() -> bool:
                return node.stats.published == 5

            await until(answered, "the five answered")
            assert broadcast("g", b"after").published is True  # room again
    finally:
        await pubsub.aclose()
        await client.aclose()


@asyncio_only
async def test_publishes_awaiting_redis_are_bounded_by_bytes_too(redis_server: RedisServer) -> None:
    client, pubsub = await subscribed(redis_server.url)
    options = cluster_options(redis_server.url, node="bytes", publish_queue_bytes=1000)
    try:
        async with serve_for_test("pywsserver.echo", cluster=options) as server:
            node = server.cluster
            assert node is not None
            # In one step of the loop: the first is written at once and awaits its reply, the rest
            # are held for the step's end, counted by bytes.
            results = [
                broadcast("g", b"a" * 600).published,  # written: the socket took it
                broadcast("g", b"b" * 600).published,  # held: about 650 bytes
                broadcast("g", b"c" * 600).published,  # would hold about 1,300: refused
                broadcast("g", b"d" * 100).published,  # held: about 800
                broadcast("g", b"e" * 2000).published,  # larger than the bound: never crosses nodes
            ]
            assert results == [True, True, False, True, False]
            assert node.stats.publish_failed == 2
            seen = await broadcasts_seen(pubsub, 3)
            assert seen == [b"a" * 600, b"b" * 600, b"d" * 100]

            async def answered() -> bool:
                return node.stats.published == 3

            await until(answered, "the three answered")
            assert broadcast("g", b"f" * 600).published is True  # room again
    finally:
        await pubsub.aclose()
        await client.aclose()


@asyncio_only
async def test_a_publish_redis_refuses_is_counted_and_the_node_goes_on(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_server.url)
    # A user that may do all the node does except PUBLISH: Redis answers each publish with an error.
    await admin.execute_command("ACL", "SETUSER", "nopublish", "on", ">secret", "~*", "&*", "+@all", "-publish")
    url = redis_server.url.replace("redis://", "redis://nopublish:secret@")
    options = cluster_options(url, node="refused", log_interval=60.0, send_timeout=30.0)
    try:
        async with serve_for_test("tests.cluster_node:Handler", cluster=options) as server:
            node = server.cluster
            assert node is not None
            async with connect(f"ws://127.0.0.1:{server.port}/") as client:
                with caplog.at_level(logging.WARNING, logger="pywsserver.cluster"):
                    for number in range(3):
                        result = broadcast("chat", f"local {number}")
                        assert (result.delivered, result.published) == (1, True)  # written: the reply says no
                        assert await receive(client) == f"local {number}"

                        async def refused(expected: int = number + 1) -> bool:
                            return node.stats.publish_failed == expected

                        await until(refused, f"refusal {number + 1} read and counted")
                    # A send's publish refused fails at once, not when its 30 s timeout ends.
                    with anyio.fail_after(5), pytest.raises(cluster.ClusterUnavailable, match="NOPERM"):
                        await cluster.send("elsewhere/0000/1", "lost")
                assert node.stats.publish_failed == 4 and node.stats.published == 0
                refusals = [r.getMessage() for r in caplog.records if "Redis refused a publish" in r.getMessage()]
                assert len(refusals) == 1 and "NOPERM" in refusals[0], refusals  # once per log_interval
                # The link stayed up all along: no reconnection, and the node serves on.
                assert node.connected and (node.stats.connections, node.stats.link_failures) == (1, 0)
                assert await ask(client, "nodes") == json.dumps(["refused"])
    finally:
        await admin.aclose()


@asyncio_only
async def test_a_publish_unanswered_past_connect_timeout_ends_the_link_and_it_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    # Heartbeats 5 s apart: what ends the link is the publish's overdue reply, not a heartbeat's.
    options = cluster_options(
        redis_server.url, node="overdue", connect_timeout=0.5, max_backoff=0.2, heartbeat_interval=5, node_timeout=10
    )
    try:
        async with serve_for_test("pywsserver.echo", cluster=options) as server:
            node = server.cluster
            assert node is not None
            await client.execute_command("CLIENT", "PAUSE", "2500", "ALL")  # Redis answers nothing for 2.5 s
            assert broadcast("g", b"unanswered").published is True

            async def dropped() -> bool:
                return node.stats.link_failures >= 1

            # Overdue after 0.5 s, seen within 0.75 s (the watch looks every half of connect_timeout).
            with caplog.at_level(logging.WARNING, logger="pywsserver.cluster"):
                await until(dropped, "the link ended for the unanswered publish", attempts=30)
            assert "Redis did not answer a publish within 0.5s" in caplog.text
            assert node.stats.publish_failed == 1 and node.stats.published == 0

            async def back() -> bool:
                return node.connected and node.stats.connections >= 2

            await until(back, "the link back once Redis answers again")
            assert broadcast("g", b"again").published is True
    finally:
        await client.aclose()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the load generator")
def test_the_cluster_benchmark_servers_deliver_every_broadcast(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from .cluster_tools import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run as bench

    monkeypatch.setenv("BENCH_REDIS_URL", redis_server.url)
    loadgen = bench.build("loadgen")
    for name, cpus, processes in bench.CLUSTER_SERVERS:
        server = bench.start(name, cpus, processes)
        try:
            arguments = ["broadcast", "--conns", "40", "--count", "5", "--one-at-a-time"]
            result = bench.run_loadgen(loadgen, server.port, arguments, 1)
            assert result["deliveries"] == result["expected"] == 5 * 41, name
        finally:
            server.stop()


def test_the_command_line_names_the_cluster_option_when_it_cannot_start() -> None:
    import subprocess
    import sys

    from .cluster_tools import ROOT, free_port

    def pywsserver_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pywsserver", "--port", "0", *arguments]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)

    dead = f"redis://127.0.0.1:{free_port()}/0"
    on_trio = pywsserver_cli("--cluster-url", dead, "--backend", "trio")
    assert on_trio.returncode == 2
    assert "pywsserver: cluster: the Redis client (redis.asyncio) runs on asyncio only" in on_trio.stderr
    unreachable = pywsserver_cli("--cluster-url", dead)
    assert unreachable.returncode == 1  # cannot start (as a port in use), not a bad option
    assert f"pywsserver: cluster.url: cannot use the Redis server at {dead}" in unreachable.stderr
    assert "cluster.url: expected a redis://" in pywsserver_cli("--cluster-url", "http://x").stderr


@asyncio_only
async def test_a_clean_stop_reads_the_replies_of_the_publishes_written_and_reports_none_lost(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client, pubsub = await subscribed(redis_server.url)
    sent = [f"last{number:03d}".encode() for number in range(200)]
    try:
        with caplog.at_level(logging.WARNING, logger="pywsserver.cluster"):
            async with serve_for_test("pywsserver.echo", cluster=cluster_options(redis_server.url, node="n")) as server:
                node = server.cluster
                assert node is not None
                # The server stops right after a burst: written (or held), their replies not read yet.
                assert all(broadcast("g", data).published for data in sent)
        assert await broadcasts_seen(pubsub, 200) == sent
        assert (node.stats.published, node.stats.publish_failed) == (200, 0)
        assert not [record.getMessage() for record in caplog.records if "lost" in record.getMessage()]
    finally:
        await pubsub.aclose()
        await client.aclose()
