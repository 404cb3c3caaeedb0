"""The cluster node: this server's link to Redis, a supervised subtree of the server's tree.

::

    ClusterSupervisor     one_for_one; intensity from the reconnect schedule (see below)
    └── RedisLink         permanent: connects, subscribes, then reads its two connections itself
        │                 (the subscription, the replies to its publishes: see "Reading" below)
        │                 and runs two tasks:
        ├── watch         ends the link when a connection is lost or a reply is overdue
        └── heartbeat     writes the node's presence (groups and counts) and its names, with expiry

A lost link is an exit of the ``RedisLink`` child: it waits its backoff
(0.1 s doubling up to ``max_backoff``) and returns, and the supervisor
restarts it, which connects and subscribes again. The supervisor's
intensity is set so that this schedule alone never exceeds it (an outage of
any length leaves the server up, serving its local connections), while a
crash loop (the link failing at once after connecting) does, and climbs the
tree as any crash does.

Nothing local waits on Redis. Publishing: the node holds one connection of
its own for its publishes (broadcasts, sends, casts, answers), all of them in
the order they are made. A publish made while that connection is idle (no
reply awaited, nothing held) is written to the socket at once, before
``broadcast`` goes on to its local members, so that the other nodes start
delivering while this one does; a publish made while replies are awaited is
held until the end of the event loop's step and written with the others held
meanwhile (one write, one round trip for a burst). Either way nothing waits
for a task to wake up. Each publish is one RESP command built in one piece,
and one write. Redis answers each publish in order (a reply awaited longer
than ``connect_timeout`` ends the link); publishes written whose reply is
unread are at most ``publish_queue``: beyond, and while the link is down, a
publish fails at once and is counted.

Reading: redis-py connects, authenticates and subscribes; then the node reads
both of its connections itself (`pywsserver.cluster._resp`), in the event
loop's read callback: a broadcast from another node is decoded where it lies
and handed to the group's delivery at once, with no task woken and no message
dict per message, and a publish's reply is counted the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from time import monotonic
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.lowlevel
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .._broadcast import _deliver
from .._errors import ConnectionClosed
from .._throttle import ThrottledReport
from ..supervision import ChildSpec, ChildType, MailboxFull, NotRunning, Supervisor, cast, whereis
from ..supervision._groups import count, members, which_groups
from . import _state, _wire
from ._address import local_worker
from ._errors import ClusterStartError, ClusterUnavailable, NameRegisteredElsewhere
from ._options import ClusterOptions
from ._resp import RespError, RespReader, take_over
from ._state import ClusterStats
from ._wire import _LENGTH, Status

__all__ = ["ClusterNode", "ClusterStartError", "ClusterStats", "ClusterUnavailable"]

logger = logging.getLogger("pywsserver.cluster")

#: The period, in seconds, over which the cluster supervisor counts restarts.
PERIOD = 60.0
#: Refreshes a name's claim if this node holds it (or nobody does): 1 if held, 0 if another node has it.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
#: Deletes a name's claim if this node holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _publish_head(channel: bytes) -> bytes:
    """A PUBLISH command in RESP up to its message: the message's length line and bytes follow."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n" % (len(channel), channel)


def backoff(failures: int, maximum: float) -> float:
    """Seconds to wait before the attempt after ``failures`` failures in a row: 0.1 doubling, capped."""
    if failures <= 0:
        return 0.0
    return min(maximum, 0.1 * 2.0 ** min(failures - 1, 30))


def intensity_for(maximum: float, period: float = PERIOD) -> int:
    """Restarts the reconnect schedule makes within ``period`` at most, plus a margin: the supervisor's bound."""
    elapsed, restarts = 0.0, 0
    while elapsed < period:
        restarts += 1
        elapsed += backoff(restarts, maximum)
    return restarts + 5


class _Pending:
    """A send or cast waiting for its answer (or for Redis's refusal of its publish)."""

    __slots__ = ("done", "refusal", "status")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.status: Status | None = None
        self.refusal: bytes | None = None

    def answer(self, status: Status) -> None:
        if self.status is None:
            self.status = status
            self.done.set()

    def refuse(self, refusal: bytes) -> None:
        if self.status is None and self.refusal is None:
            self.refusal = refusal
            self.done.set()


#: Errors that mean "Redis is unreachable or gone", as opposed to a bug.
_LINK_ERRORS = (RedisError, OSError, TimeoutError, asyncio.IncompleteReadError)


class ClusterNode:
    """One server's membership of the cluster: its Redis link, its presence and its names."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        #: This node's name in the cluster.
        self.name = options.node or f"{socket.gethostname()}-{os.getpid()}"
        #: This run of the node: addresses made before a restart do not reach the new run's connections.
        self.run = secrets.token_hex(4)
        #: What the node has done so far.
        self.stats = ClusterStats()
        prefix = options.prefix
        self._broadcast_channel = f"{prefix}:broadcast".encode()
        self._inbox = self.inbox_of(self.name)
        # A broadcast's origin field as this node writes it: its own come back from Redis, skipped unread.
        self._own_origin = len(self.name.encode()).to_bytes(4, "big") + self.name.encode()
        # A broadcast's PUBLISH command up to its message, and the message's size without group, code, data.
        channel = self._broadcast_channel
        self._broadcast_command = _publish_head(channel)
        self._broadcast_size = 2 + len(self._own_origin) + 4 + 4
        self._nodes_key = f"{prefix}:nodes"
        self._started_at = time.time()
        self._client: aioredis.Redis | None = None
        self._connected = False
        self._first_start = True
        self._failures = 0
        # Publishing (see the module's docstring): the transport of the node's publishing connection
        # while the link is up, the reply ids of the publishes written whose reply is unread (0: none
        # wanted), the publishes held until the end of this step (one command each), when a reply
        # last came (or the first publish awaiting one left), and what a clean stop waits for.
        self._transport: asyncio.Transport | None = None
        self._in_flight: collections.deque[int] = collections.deque()
        self._held: list[bytes] = []
        self._held_bytes = 0  # their total size (see `_write`: bounded with the transport's buffer)
        self._progress_at = 0.0
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by a reader when its connection is lost: the reason, and the exception if it was a crash.
        self._lost: asyncio.Event | None = None
        self._lost_because: tuple[str, Exception | None] = ("", None)
        self._pending: dict[int, _Pending] = {}
        self._reply_ids = itertools.count(1)
        #: Names this node holds across the cluster.
        self._names: set[str] = set()
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._report = ThrottledReport(logger, interval=options.log_interval, level=logging.WARNING)
        self._warned_at: dict[str, float] = {}
        #: The node's own supervisor; its child ``link`` is the connection to Redis.
        self.supervisor = Supervisor(
            [ChildSpec("link", self._link, shutdown=max(2.0, options.connect_timeout))],
            strategy="one_for_one",
            intensity=intensity_for(options.max_backoff),
            period=PERIOD,
            name=None,
        )

    def __repr__(self) -> str:
        return f"<ClusterNode {self.name} {_safe_url(self.options.url)}>"

    # ------------------------------------------------------------ the tree

    def child_spec(self, id: str = "cluster") -> ChildSpec:
        """The node as a child of the server's supervisor (a supervisor child, its ref this node)."""
        return ChildSpec(id, self.serve, type=ChildType.SUPERVISOR, shutdown=max(5.0, 2 * self.options.connect_timeout))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[ClusterNode] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the node's subtree; the process's broadcasts and addresses reach the cluster meanwhile."""
        if _state.current is not None and _state.current is not self:
            raise ClusterStartError(
                f"cluster: this process already runs the cluster node {_state.current.name!r}; "
                "one cluster node per process (groups are per process)"
            )
        self._token = anyio.lowlevel.current_token()
        _state.current = self
        try:
            await self.supervisor.run(task_status=_Report(task_status, self))
        finally:
            if _state.current is self:
                _state.current = None

    @property
    def connected(self) -> bool:
        """Whether the link to Redis is up now."""
        return self._connected

    # ------------------------------------------------------------ the link

    def _new_client(self) -> aioredis.Redis:
        timeout = self.options.connect_timeout
        return aioredis.Redis.from_url(
            self.options.url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a lost link is this module's to handle, at once
            client_name=f"pywsserver:{self.name}",
        )

    async def _link(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        first, self._first_start = self._first_start, False
        must_connect = first and not self.options.wait_for_redis
        if not must_connect:
            task_status.started()
            await anyio.sleep(backoff(self._failures, self.options.max_backoff))
        client = self._new_client()
        pubsub = client.pubsub()
        readers: list[RespReader] = []
        # The node's publishing connection, its own (not in the pool the queries share).
        lane = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                with anyio.fail_after(self.options.connect_timeout):
                    await pubsub.subscribe(self._broadcast_channel, self._inbox)
                    await lane.connect()
                    await self._heartbeat(client)
                    readers = self._take_over(pubsub.connection, lane)
            except (*_LINK_ERRORS, ValueError) as error:
                self._failures += 1
                self.stats.link_failures += 1
                if must_connect:
                    raise ClusterStartError(
                        f"cluster.url: cannot use the Redis server at {_safe_url(self.options.url)}: "
                        f"{_describe(error)} (with cluster.wait_for_redis the server starts anyway and keeps trying)"
                    ) from None
                self._warn(
                    "link",
                    "cannot reach Redis at %s (%s); next attempt in %.1fs",
                    _safe_url(self.options.url),
                    _describe(error),
                    backoff(self._failures, self.options.max_backoff),
                )
                return  # a normal exit: the supervisor restarts the link (it is permanent)
            if must_connect:
                task_status.started()
            self._failures = 0
            self._client = client
            self._connected = True
            self.stats.connections += 1
            if self.stats.connections > 1:
                logger.warning("cluster node %s: connected to Redis again (%s)", self.name, _safe_url(self.options.url))
                self._warned_at.clear()
            else:
                logger.info("cluster node %s joined the cluster at %s", self.name, _safe_url(self.options.url))
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._watch)
                    group.start_soon(self._heartbeats, client)
            except* _LINK_ERRORS as errors:
                self._failures = 1
                self.stats.link_failures += 1
                self._warn("link", "lost the link to Redis (%s); reconnecting", _describe(errors.exceptions[0]))
        except anyio.get_cancelled_exc_class():
            # The server stops: leave the presence and release the names now rather than at expiry.
            if self._connected:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._drain()
                    await self._leave(client)
            raise
        finally:
            self._connected = False
            self._client = None
            for reader in readers:
                reader.stop()
            self._close_lane()
            self._fail_pending()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
                await lane.disconnect()
                await pubsub.aclose()
                await client.aclose()

    async def _leave(self, client: aioredis.Redis) -> None:
        """A clean stop: the node leaves the presence and releases its names now, not at expiry."""
        with contextlib.suppress(*_LINK_ERRORS):
            prefix = self.options.prefix
            pipe = client.pipeline(transaction=False)
            pipe.srem(self._nodes_key, self.name)
            pipe.delete(f"{prefix}:alive:{self.name}", f"{prefix}:presence:{self.name}")
            for name in self._names:
                pipe.eval(_RELEASE, 1, f"{prefix}:name:{name}", self._holder)
            await pipe.execute()

    async def _drain(self) -> None:
        """A clean stop: what is held is written and each publish written gets its reply (not lost)."""
        self._flush()
        lost = self._lost
        if self._in_flight and self._transport is not None and lost is not None and not lost.is_set():
            self._drained = asyncio.Event()
            try:
                await self._drained.wait()  # set by the last reply, or by the connection's loss
            finally:
                self._drained = None

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log a fault at most once per ``log_interval`` seconds per kind."""
        now = time.monotonic()
        last = self._warned_at.get(kind)
        if last is not None and now - last < self.options.log_interval:
            return
        self._warned_at[kind] = now
        logger.warning("cluster node %s: " + message, self.name, *args)

    def _take_over(self, subscription: Any, lane: Any) -> list[RespReader]:
        """Read the subscription and the publishing connection (``lane``) from now on, and publish through it."""
        self._lost = lost = asyncio.Event()

        def on_lost(reason: str, error: Exception | None) -> None:
            if not lost.is_set():
                self._lost_because = (reason, error)
                lost.set()
                if self._drained is not None:
                    self._drained.set()  # no more replies will come

        readers = [RespReader(on_lost, on_message=self._on_message), RespReader(on_lost, on_value=self._on_reply)]
        take_over(subscription, readers[0])
        self._transport = take_over(lane, readers[1])
        self._loop = asyncio.get_running_loop()
        return readers

    def _close_lane(self) -> None:
        """The link is gone: what was written without a reply, or held, is lost for the other nodes."""
        self._transport = None
        self._held = []
        self._held_bytes = 0
        lost = len(self._in_flight)
        self._in_flight.clear()
        if lost:
            self.stats.publish_failed += lost
            self._warn("lost", "%d publishes lost with the link to Redis (sent without an answer)", lost)

    def _flush(self) -> None:
        """Write the publishes held during the last step, in one write."""
        held, self._held = self._held, []
        self._held_bytes = 0
        if held and self._transport is not None:
            self._transport.writelines(held)
            self.stats.written += len(held)

    def _fail_pending(self) -> None:
        for pending in self._pending.values():
            pending.done.set()  # status None: no answer, Redis went away

    # ------------------------------------------------------------ tasks

    async def _watch(self) -> None:
        """End the link when a connection is lost, or when Redis has not answered a publish in time."""
        lost = self._lost
        assert lost is not None
        timeout = self.options.connect_timeout
        while True:
            with anyio.move_on_after(timeout / 2):
                await lost.wait()
                reason, error = self._lost_because
                if error is not None and not isinstance(error, ValueError):
                    raise error  # a crash of what a message led to, not a fault of the link
                raise ConnectionError(reason)
            if self._in_flight and monotonic() - self._progress_at > timeout:
                raise TimeoutError(f"Redis did not answer a publish within {timeout:g}s (cluster.connect_timeout)")

    def _on_reply(self, value: Any) -> None:
        """Redis's reply to the oldest publish awaiting one: counted; a send to nobody is answered at once."""
        in_flight = self._in_flight
        if not in_flight:
            return  # the link is being taken down
        reply = in_flight.popleft()
        self._progress_at = monotonic()
        if type(value) is int:
            self.stats.published += 1
            if reply and not value:  # nobody subscribes to that node's inbox: the node is gone
                waiting = self._pending.get(reply)
                if waiting is not None:
                    waiting.answer(Status.GONE)
        else:
            self.stats.publish_failed += 1
            refusal = bytes(value) if isinstance(value, RespError) else repr(value).encode()
            self._warn("refused", "Redis refused a publish: %r", refusal)
            waiting = self._pending.get(reply) if reply else None
            if waiting is not None:
                waiting.refuse(refusal)  # its sender fails now, not at its timeout
        if not in_flight and self._drained is not None:
            self._drained.set()

    async def _heartbeats(self, client: aioredis.Redis) -> None:
        while True:
            await anyio.sleep(self.options.heartbeat_interval)
            with anyio.fail_after(self.options.connect_timeout):
                await self._heartbeat(client)

    @property
    def _holder(self) -> str:
        return f"{self.name}/{self.run}"

    async def _heartbeat(self, client: aioredis.Redis) -> None:
        """Write this node's presence and refresh its names, each with the expiry ``node_timeout``."""
        prefix = self.options.prefix
        ttl = math.ceil(self.options.node_timeout * 1000)
        counts = {group: count(group) for group in which_groups()}
        presence_key = f"{prefix}:presence:{self.name}"
        info = json.dumps(
            {"run": self.run, "pid": os.getpid(), "host": socket.gethostname(), "since": self._started_at}
        )
        names = sorted(self._names)
        pipe = client.pipeline(transaction=True)
        pipe.sadd(self._nodes_key, self.name)
        pipe.set(f"{prefix}:alive:{self.name}", info, px=ttl)
        pipe.delete(presence_key)
        if counts:
            pipe.hset(presence_key, mapping={group: n for group, n in counts.items() if n})
            pipe.pexpire(presence_key, ttl)
        for name in names:
            pipe.eval(_CLAIM, 1, f"{prefix}:name:{name}", self._holder, ttl)
        results = await pipe.execute()
        for name, held in zip(names, results[len(results) - len(names) :], strict=True):
            if not held:
                self._names.discard(name)
                logger.warning(
                    "cluster node %s: the name %r is now held by another node (this node's claim expired "
                    "while it was cut off from Redis); it stays registered in this process only",
                    self.name,
                    name,
                )

    # ------------------------------------------------------------ receiving

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            kind = data[:1]
            if kind == b"B":
                if data.startswith(self._own_origin, 2):
                    return  # this node's own broadcast, delivered locally when it was made
                self._on_broadcast(data)
            elif kind == b"S":
                self._on_send(data)
            elif kind == b"C":
                self._on_cast(data)
            elif kind == b"A":
                _, _, (reply, status), _ = _wire.decode(data, 2)
                waiting = self._pending.get(int(reply))
                if waiting is not None:
                    waiting.answer(Status(int(status)))
            else:
                raise _wire.WireError(f"unknown kind {kind!r}")
        except (_wire.WireError, ValueError) as error:
            self.stats.malformed += 1
            self._report("malformed cluster messages", f"on {channel!r}: {error} ({data[:64]!r})")

    def _on_broadcast(self, data: bytes) -> None:
        # Another node's broadcast (this node's own were skipped by _on_message): decoded where it
        # lies, no list of fields, and delivered here and now, from the read callback.
        flags, group_raw, code, payload = _wire.decode_broadcast(data)
        self.stats.received += 1
        group = group_raw.decode("utf-8", "surrogatepass")
        targets = members(group)
        if targets:
            message = payload.decode() if flags & _wire.TEXT else payload
            _deliver(group, targets, message, "close" if flags & _wire.CLOSE else "drop", code)

    def _on_send(self, data: bytes) -> None:
        _, flags, (origin, reply, run, connection), payload = _wire.decode(data, 4)
        status = Status.GONE
        worker = local_worker(int(connection)) if run.decode() == self.run else None
        if worker is not None:
            try:
                worker.send_nowait(_wire.unpack_payload(flags & _wire.TEXT, payload))
                status = Status.OK
            except MailboxFull:
                status = Status.FULL
            except ConnectionClosed:
                pass
        self._answer(origin, reply, status)

    def _on_cast(self, data: bytes) -> None:
        _, flags, (origin, reply, name), payload = _wire.decode(data, 3)
        self._answer(origin, reply, self._cast_here(name.decode(), _wire.unpack_payload(flags, payload)))

    def _cast_here(self, name: str, message: Any) -> Status:
        if whereis(name) is None:
            return Status.NO_NAME
        try:
            cast(name, message)
        except MailboxFull:
            return Status.FULL
        except NotRunning:
            return Status.NO_NAME
        return Status.OK

    def _answer(self, origin: bytes, reply: bytes, status: Status) -> None:
        self._publish(self.inbox_of(origin.decode()), _wire.encode(b"A", 0, [reply, b"%d" % status], b""))

    @property
    def _name_bytes(self) -> bytes:
        return self.name.encode()

    def inbox_of(self, node: str) -> bytes:
        """The channel a node reads its sends, casts and answers from."""
        return f"{self.options.prefix}:node:{node}".encode()

    # ------------------------------------------------------------ sending

    def _publish(self, channel: bytes, payload: bytes, reply: int = 0) -> bool:
        """Publish, in order: at once if the connection is idle, else at the end of this step.

        ``False`` at once when the link is down or ``publish_queue`` publishes await their reply.
        """
        command = b"%b$%d\r\n%b\r\n" % (_publish_head(channel), len(payload), payload)
        return self._write(command, reply)

    def _write(self, command: bytes, reply: int) -> bool:
        """Write one PUBLISH command (see `_publish`), or hold it, or refuse it."""
        transport = self._transport
        if not self._connected or transport is None:
            self.stats.publish_failed += 1
            self._warn("publish", "Redis is unreachable: publishes fail until the link is back (counted)")
            return False
        in_flight = self._in_flight
        if len(in_flight) >= self.options.publish_queue:
            self.stats.publish_failed += 1
            self._warn(
                "queue",
                "%d publishes await their reply from Redis already (cluster.publish_queue): dropping",
                self.options.publish_queue,
            )
            return False
        # Bounded by bytes too: what is held for the step's end and what the transport has not
        # handed to the socket yet (Redis reading slower than large broadcasts are made).
        size = len(command)
        if self._held_bytes + transport.get_write_buffer_size() + size > self.options.publish_queue_bytes:
            self.stats.publish_failed += 1
            self._warn(
                "queue_bytes",
                "a publish of %d bytes would take the bytes awaiting Redis beyond %d "
                "(cluster.publish_queue_bytes): dropping",
                size,
                self.options.publish_queue_bytes,
            )
            return False
        if not in_flight:  # idle (nothing held either: what is held awaits its reply)
            transport.write(command)
            self.stats.written += 1
            self._progress_at = monotonic()
        else:
            if not self._held:
                loop = self._loop
                assert loop is not None
                loop.call_soon(self._flush)
            self._held.append(command)
            self._held_bytes += size
        in_flight.append(reply)
        return True

    def publish_broadcast(self, group: str, data: str | bytes, slow: str, close_code: int) -> bool:
        """Queue the broadcast for the other nodes: one publish, whatever their number and members'."""
        if isinstance(data, str):
            flags, payload = _wire.TEXT, data.encode()
        else:
            flags, payload = 0, data
        if slow == "close":
            flags |= _wire.CLOSE
        group_field = group.encode("utf-8", "surrogatepass")
        code = b"%d" % close_code
        # The PUBLISH command and the broadcast in it (as _wire.encode lays it out) built in one piece:
        # the data is copied once (three copies through _wire.encode and _publish).
        size = self._broadcast_size + len(group_field) + len(code) + len(payload)
        command = b"%b$%d\r\nB%c%b%b%b%b%b%b\r\n" % (
            self._broadcast_command,
            size,
            flags,
            self._own_origin,
            _LENGTH.pack(len(group_field)),
            group_field,
            _LENGTH.pack(len(code)),
            code,
            payload,
        )
        return self._write(command, 0)

    async def request(
        self, node: str, kind: bytes, flags: int, fields: list[bytes], payload: bytes, timeout: float
    ) -> Status:
        """Publish a send or cast to ``node`` and wait for its answer (`ClusterUnavailable` without one)."""
        if len(self._pending) >= self.options.publish_queue:
            raise ClusterUnavailable(f"{len(self._pending)} sends wait for an answer already (cluster.publish_queue)")
        reply = next(self._reply_ids)
        waiting = self._pending[reply] = _Pending()
        try:
            message = _wire.encode(kind, flags, [self._name_bytes, b"%d" % reply, *fields], payload)
            if not self._publish(self.inbox_of(node), message, reply):
                raise ClusterUnavailable(f"Redis is unreachable ({_safe_url(self.options.url)})")
            with anyio.move_on_after(timeout):
                await waiting.done.wait()
        finally:
            del self._pending[reply]
        if waiting.refusal is not None:
            raise ClusterUnavailable(f"Redis refused the publish: {waiting.refusal.decode(errors='replace')}")
        if waiting.status is None:
            if not self._connected:
                raise ClusterUnavailable("the link to Redis was lost before the node answered")
            alive_key = f"{self.options.prefix}:alive:{node}"
            if not await self._command(lambda client: client.exists(alive_key)):
                return Status.GONE  # it died (its presence expired) without answering
            raise ClusterUnavailable(f"node {node!r} did not answer within {timeout:g}s")
        return waiting.status

    def cast_here(self, name: str, message: Any) -> Status:
        """Cast to a gen server registered in this process."""
        return self._cast_here(name, message)

    # ------------------------------------------------------------ queries

    async def _command(self, run: Callable[[aioredis.Redis], Any]) -> Any:
        client = self._client
        if client is None or not self._connected:
            raise ClusterUnavailable(f"Redis is unreachable ({_safe_url(self.options.url)})")
        try:
            with anyio.fail_after(self.options.connect_timeout):
                return await run(client)
        except _LINK_ERRORS as error:
            raise ClusterUnavailable(f"Redis did not answer: {_describe(error)}") from error

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The live nodes, each with what it says of itself (run, pid, host, since)."""
        prefix = self.options.prefix

        async def query(client: aioredis.Redis) -> dict[str, dict[str, Any]]:
            raw: Any = await client.smembers(self._nodes_key)
            names = sorted(name.decode() for name in raw)
            if not names:
                return {}
            infos = await client.mget([f"{prefix}:alive:{name}" for name in names])
            gone = [name for name, info in zip(names, infos, strict=True) if info is None]
            if gone:
                await client.srem(self._nodes_key, *gone)  # expired: died without leaving
            return {name: json.loads(info) for name, info in zip(names, infos, strict=True) if info is not None}

        result: dict[str, dict[str, Any]] = await self._command(query)
        return result

    async def presence(self, group: str | None) -> dict[str, dict[str, int]]:
        """Per live node, its groups and their member counts (only ``group`` if given)."""
        live = await self.nodes()
        prefix = self.options.prefix

        async def query(client: aioredis.Redis) -> dict[str, dict[str, int]]:
            pipe = client.pipeline(transaction=False)
            for node in live:
                if group is None:
                    pipe.hgetall(f"{prefix}:presence:{node}")
                else:
                    pipe.hget(f"{prefix}:presence:{node}", group)
            answers = await pipe.execute()
            result: dict[str, dict[str, int]] = {}
            for node, answer in zip(live, answers, strict=True):
                if group is None:
                    result[node] = {key.decode(): int(value) for key, value in answer.items()}
                elif answer is not None:
                    result[node] = {group: int(answer)}
            return result

        result: dict[str, dict[str, int]] = await self._command(query)
        return result

    async def register(self, name: str) -> None:
        """Claim ``name`` across the cluster for this node (`NameRegisteredElsewhere` if another holds it)."""
        ttl = math.ceil(self.options.node_timeout * 1000)
        key = f"{self.options.prefix}:name:{name}"
        held = await self._command(lambda client: client.eval(_CLAIM, 1, key, self._holder, ttl))
        if not held:
            holder = await self.whereis(name)
            raise NameRegisteredElsewhere(name, holder)
        self._names.add(name)

    async def unregister(self, name: str) -> None:
        """Release ``name`` if this node holds it."""
        self._names.discard(name)
        key = f"{self.options.prefix}:name:{name}"
        await self._command(lambda client: client.eval(_RELEASE, 1, key, self._holder))

    async def whereis(self, name: str) -> str | None:
        """The node holding ``name``, or ``None``."""
        key = f"{self.options.prefix}:name:{name}"
        holder = await self._command(lambda client: client.get(key))
        if holder is None:
            return None
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        return text.rpartition("/")[0]


class _Report:
    def __init__(self, real: anyio.abc.TaskStatus[ClusterNode], node: ClusterNode) -> None:
        self._real = real
        self._node = node

    def started(self, value: Any = None) -> None:
        self._real.started(self._node)


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."
