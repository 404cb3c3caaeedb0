"""Broadcast: one message to every member of a process group, never blocked by a slow member.

The frame is encoded once and the same bytes are queued to every worker's
mailbox without waiting. A member whose mailbox is full cannot keep up; the
``slow`` policy says what happens to it: ``"drop"`` skips its copy,
``"close"`` drops the connection and tells its handler ``close_code``.
Gen servers in the group receive ``("broadcast", group, data)`` through
``handle_info``. What was dropped or closed is counted in the result and
logged once per broadcast, never once per member.

When the process is a node of a cluster (the ``cluster`` option), the
broadcast is also published once for the other nodes, each of which
delivers it to its own members the same way (see `pywsserver.cluster`); the
result's ``published`` says whether that publish was accepted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import anyio.from_thread
import attrs

from ._errors import ConnectionClosed
from ._worker import Worker, check_not_in_loop_thread
from .cluster import _state as _cluster
from .protocols import BroadcastAction, encode_message
from .supervision import MailboxFull, NotRunning, ServerRef, groups

__all__ = ["BroadcastResult", "broadcast", "broadcast_threadsafe"]

logger = logging.getLogger("pywsserver.groups")


@attrs.frozen
class BroadcastResult:
    """What became of one broadcast."""

    #: Members the message was queued for.
    delivered: int = 0
    #: Members that could not keep up and did not get this message (policy ``"drop"``).
    dropped: int = 0
    #: Members that could not keep up and were disconnected (policy ``"close"``).
    closed: int = 0
    #: With a cluster: whether the publish to the other nodes was accepted (``False``: Redis is
    #: unreachable or the publish queue is full; the other nodes miss this message). ``None``: no cluster.
    published: bool | None = None

    def __add__(self, other: BroadcastResult) -> BroadcastResult:
        published = self.published if other.published is None else other.published
        return BroadcastResult(
            self.delivered + other.delivered, self.dropped + other.dropped, self.closed + other.closed, published
        )


class _Totals:
    """What every broadcast of this process came to, member by member (read by the server's metrics)."""

    __slots__ = ("closed", "delivered", "dropped")

    def __init__(self) -> None:
        self.delivered = self.dropped = self.closed = 0


totals = _Totals()


def _check(data: Any, slow: str) -> None:
    if not isinstance(data, str | bytes):
        raise TypeError(f"broadcast() takes str or bytes, got {type(data).__name__}")
    if slow not in ("drop", "close"):
        raise ValueError(f"slow must be 'drop' or 'close', got {slow!r}")


def deliver_frames_python(
    members: Sequence[Hashable], frame: bytes, core_type: type[Worker]
) -> tuple[int, list[Hashable]]:
    """``member._broadcast_now(frame)`` for every member of ``core_type`` with no mailbox: how many
    took the frame, and every other member in order, untouched, for `_deliver`'s general loop.

    The twin of the C speedup's ``deliver_frames`` (``tests/test_broadcast_speedups.py`` holds
    the two equal); a member with a mailbox is left to the general loop, which asks it.
    """
    delivered = 0
    rest: list[Hashable] = []
    for member in members:
        if isinstance(member, core_type) and member._mailbox_send is None and member._broadcast_now(frame):
            delivered += 1
        else:
            rest.append(member)
    return delivered, rest


deliver_frames: Callable[[Sequence[Hashable], bytes, type[Worker]], tuple[int, list[Hashable]]]
try:
    from ._speedups import deliver_frames
except ImportError:  # pragma: no cover - depends on the installation
    deliver_frames = deliver_frames_python


def _deliver(group: str, targets: Sequence[Hashable], data: str | bytes, slow: str, close_code: int) -> BroadcastResult:
    delivered = dropped = closed = 0
    total = len(targets)  # the members asked (``targets`` becomes those the fast path handed back)
    action: BroadcastAction | None = None
    frame = b""
    if targets:
        # The common case in one call (the C speedup when built): every member that can take the
        # frame now gathers it, to be written at the end of this loop turn; the others come back
        # for the loop below. With `_asyncio_driver`'s flush in C too: 5,950 to 1,920 instructions
        # per delivery under callgrind (``benchmarks/instructions.py --mode broadcast``), 1,500 with
        # the counters added in place and a single frame's output array kept.
        frame = encode_message(data)
        delivered, targets = deliver_frames(targets, frame, Worker)
    for member in targets:
        if isinstance(member, Worker):
            if action is None:
                action = BroadcastAction(data, frame)
            if member._broadcast_now(frame):  # left by the fast path, it may still take it (an empty mailbox)
                delivered += 1
                continue
            try:
                queued = member._offer(action)
            except ConnectionClosed:
                continue
            if queued:
                delivered += 1
            elif slow == "close":
                member._abort(close_code, f"too slow for broadcasts to {group!r}")
                closed += 1
            else:
                dropped += 1
        elif isinstance(member, ServerRef):
            try:
                member.send(("broadcast", group, data))
                delivered += 1
            except MailboxFull:
                dropped += 1
            except NotRunning:
                continue
    totals.delivered += delivered
    if dropped or closed:
        totals.dropped += dropped
        totals.closed += closed
        logger.warning(
            "broadcast to %r: %d of %d members could not keep up (%d dropped this message, %d closed)",
            group,
            dropped + closed,
            total,
            dropped,
            closed,
        )
    return BroadcastResult(delivered, dropped, closed)


def broadcast(
    group: str,
    data: str | bytes,
    *,
    slow: Literal["drop", "close"] = "drop",
    close_code: int = 1013,
) -> BroadcastResult:
    """Send ``data`` to every member of ``group`` now; never waits, never fails because of a member.

    Call it from the event loop the members run in (any task; it is a plain
    function). ``slow`` is the policy for a member whose mailbox is full:
    ``"drop"`` (it misses this message) or ``"close"`` (its connection is
    dropped and its handler told ``close_code``, 1013 "try again later" by
    default). Example::

        result = broadcast("chat", "hello, everyone")
        if result.dropped:
            ...
    """
    _check(data, slow)
    node = _cluster.current
    if node is not None:
        # Published first: when the link is idle the publish leaves now, and the other nodes deliver
        # while this one writes to its own members.
        published = node.publish_broadcast(group, data, slow, close_code)
        result = _deliver(group, groups.members(group), data, slow, close_code)
        return BroadcastResult(result.delivered, result.dropped, result.closed, published)
    result = _deliver(group, groups.members(group), data, slow, close_code)
    if _cluster.island_processes:
        _warn_island()
    return result


def _warn_island() -> None:
    """Once per process: a broadcast in one of several server processes without a cluster stays in it."""
    logger.warning(
        "broadcasts stay within this process: %d server processes share the port and no cluster joins "
        "them (give the cluster option or --cluster-url to reach the members on every process)",
        _cluster.island_processes,
    )
    _cluster.island_processes = 0


def broadcast_threadsafe(
    group: str,
    data: str | bytes,
    *,
    slow: Literal["drop", "close"] = "drop",
    close_code: int = 1013,
) -> BroadcastResult:
    """`broadcast` from a thread that is not running the members' event loop.

    Blocks the calling thread until the message is queued for every member
    (and, with a cluster, for publishing).
    """
    _check(data, slow)
    by_loop: dict[Any, list[Hashable]] = {}
    for member in groups.members(group):
        token = getattr(member, "_token", None)
        if token is not None:
            check_not_in_loop_thread(token, "broadcast_threadsafe()", "broadcast() (a plain function) there")
    for member in groups.members(group):
        token = getattr(member, "_token", None)
        if token is not None:
            by_loop.setdefault(token, []).append(member)
    result = BroadcastResult()
    for token, targets in by_loop.items():
        try:
            result += anyio.from_thread.run_sync(
                functools.partial(_deliver, group, targets, data, slow, close_code), token=token
            )
        except RuntimeError:  # that event loop has ended: its members are gone
            continue
    node = _cluster.current
    if node is not None and node._token is not None:
        try:
            published = anyio.from_thread.run_sync(
                functools.partial(node.publish_broadcast, group, data, slow, close_code), token=node._token
            )
        except RuntimeError:  # the node's event loop has ended
            published = False
        result = attrs.evolve(result, published=published)
    return result
