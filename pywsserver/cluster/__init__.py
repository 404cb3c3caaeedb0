"""Groups, broadcast, send and names across processes and machines, on Redis.

Give the server a ``cluster`` option (or ``--cluster-url``) and every server
started with the same Redis and ``prefix`` is one cluster:

* ``groups.broadcast(group, data)`` reaches the group's members on every
  node: local members at once, the other nodes through one publish;
* `presence` and `count` say which nodes have members of a group, and how
  many; a node that dies leaves within ``cluster.node_timeout`` seconds;
* ``worker.address`` names a connection cluster-wide; `send` delivers to it
  from any node, and says when it is gone;
* `register` claims a gen server's name cluster-wide; `whereis` finds its
  node and `cast` reaches it from anywhere.

Example, in a handler::

    from pywsserver import cluster

    async def handle(message, state):
        if message == "who":
            return ("reply", str(await cluster.count("chat")), state)
        ...

Without a ``cluster`` option everything here works within the process (an
address's node is empty, `presence` lists this process as node ``""``).
Every wait on Redis is bounded (``cluster.connect_timeout``, or the
``timeout`` of `send`/`cast`); when Redis is unreachable the remote part fails
at once with `ClusterUnavailable`. The guide is ``docs/cluster.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ConnectionClosed
from ..supervision import MailboxFull, NotRunning
from ..supervision import register as register_locally
from ..supervision import whereis as whereis_locally
from ..supervision._groups import count as count_locally
from ..supervision._groups import which_groups
from . import _state, _wire
from ._address import Address, address_of, local_worker
from ._errors import ClusterStartError, ClusterUnavailable, NameRegisteredElsewhere
from ._options import ClusterOptions
from ._state import ClusterStats

if TYPE_CHECKING:
    from .._worker import Worker
    from ._node import ClusterNode

__all__ = [
    "Address",
    "ClusterOptions",
    "ClusterStartError",
    "ClusterStats",
    "ClusterUnavailable",
    "NameRegisteredElsewhere",
    "address",
    "cast",
    "count",
    "node",
    "nodes",
    "presence",
    "register",
    "send",
    "stats",
    "unregister",
    "whereis",
]


def _current() -> ClusterNode | None:
    return _state.current


def node() -> str | None:
    """This process's node name, or ``None`` when it runs no cluster node."""
    current = _current()
    return current.name if current is not None else None


def address(worker: Worker) -> Address:
    """``worker``'s cluster-wide address (the same as ``worker.address``)."""
    return address_of(worker)


def stats() -> ClusterStats | None:
    """This node's counters (published, publish_failed, received, ...), or ``None`` without a cluster."""
    current = _current()
    return current.stats if current is not None else None


async def send(target: Address | str, data: str | bytes, *, timeout: float | None = None) -> None:
    """Queue ``data`` for the connection at ``target`` (an `Address` or its ``str``), on whichever node.

    Returns once the target's node has queued it for the connection (as
    ``worker.send_nowait`` does). Raises `ConnectionClosed` when the
    connection is gone (closed, its node stopped or restarted since, or its
    node dead), `MailboxFull` when its mailbox is full, and
    `ClusterUnavailable` when Redis is unreachable or refuses the publish
    (an error reply, at once), or the node did not answer within
    ``timeout`` (``cluster.send_timeout`` by default).
    """
    if not isinstance(data, str | bytes):
        raise TypeError(f"send() takes str or bytes, got {type(data).__name__}")
    if isinstance(target, str):
        target = Address.parse(target)
    current = _current()
    if current is None or (target.node == current.name and target.run == current.run):
        if current is None and target.node:
            raise ClusterUnavailable(f"this process runs no cluster node: cannot reach {target}")
        worker = local_worker(target.connection_id)
        if worker is None:
            raise ConnectionClosed(f"connection {target} is gone")
        worker.send_nowait(data)
        return
    if target.node == current.name:
        raise ConnectionClosed(f"connection {target} is gone (its node restarted since)")
    flags, payload = _wire.pack(data)
    fields = [target.run.encode(), b"%d" % target.connection_id]
    wait = timeout if timeout is not None else current.options.send_timeout
    status = await current.request(target.node, b"S", flags, fields, payload, wait)
    _check(status, f"connection {target}")


def _check(status: _wire.Status, what: str) -> None:
    if status is _wire.Status.GONE:
        raise ConnectionClosed(f"{what} is gone")
    if status is _wire.Status.FULL:
        raise MailboxFull(f"the mailbox of {what} is full")
    if status is _wire.Status.NO_NAME:
        raise NotRunning(f"{what} is not registered")


async def register(name: str, process: Any = None) -> None:
    """Make the gen server registered as ``name`` here reachable by that name from every node.

    ``process`` (a gen server's ref) is registered locally first, unless
    ``name`` already is. The first node to claim a name holds it until it
    unregisters it or stops (or dies: then the name expires with its
    presence); a claim of a name another node holds raises
    `NameRegisteredElsewhere` (a `NameAlreadyRegistered`) naming that node.
    """
    if process is not None and whereis_locally(name) is None:
        register_locally(name, process)
    elif whereis_locally(name) is None:
        raise NotRunning(f"no process is registered as {name!r} in this process")
    current = _current()
    if current is not None:
        await current.register(name)


async def unregister(name: str) -> None:
    """Release ``name`` cluster-wide if this node holds it (the local registration stays)."""
    current = _current()
    if current is not None:
        await current.unregister(name)


async def whereis(name: str) -> str | None:
    """The node holding ``name`` cluster-wide (this process's node for a local-only name), or ``None``."""
    current = _current()
    if current is None:
        return "" if whereis_locally(name) is not None else None
    holder: str | None = await current.whereis(name)
    return holder


async def cast(name: str, message: Any, *, timeout: float | None = None) -> None:
    """Cast ``message`` to the gen server registered as ``name`` on whichever node holds the name.

    A message that crosses nodes must be ``str``, ``bytes`` or JSON (tuples
    arrive as lists). Returns once the gen server's mailbox took it; raises
    `NotRunning` when no node holds ``name``, `MailboxFull` when the mailbox
    is full, `ClusterUnavailable` as `send` does.
    """
    current = _current()
    holder = await whereis(name)
    if holder is None:
        raise NotRunning(f"no node holds the name {name!r}")
    if current is None or holder == current.name:
        status = current.cast_here(name, message) if current is not None else _cast_here(name, message)
        _check(status, f"the process registered as {name!r}")
        return
    flags, payload = _wire.pack(message)
    wait = timeout if timeout is not None else current.options.send_timeout
    status = await current.request(holder, b"C", flags, [name.encode()], payload, wait)
    _check(status, f"the process registered as {name!r} on node {holder!r}")


def _cast_here(name: str, message: Any) -> _wire.Status:
    from ..supervision import cast as cast_locally

    try:
        cast_locally(name, message)
    except MailboxFull:
        return _wire.Status.FULL
    except NotRunning:
        return _wire.Status.NO_NAME
    return _wire.Status.OK


async def nodes() -> list[str]:
    """The live nodes of the cluster, sorted (``[""]`` without a cluster: this process)."""
    current = _current()
    if current is None:
        return [""]
    live = await current.nodes()
    return sorted(live)


async def presence(group: str | None = None) -> dict[str, dict[str, int]]:
    """Per live node with members: its groups and member counts (only ``group``'s if given).

    Each node writes its counts every ``cluster.heartbeat_interval``
    seconds, so a join shows up within that time; a dead node's counts
    disappear within ``cluster.node_timeout`` seconds.
    """
    current = _current()
    if current is None:
        local = {g: count_locally(g) for g in ([group] if group is not None else which_groups())}
        local = {g: n for g, n in local.items() if n}
        return {"": local} if local else {}
    result: dict[str, dict[str, int]] = await current.presence(group)
    return {node: groups for node, groups in result.items() if groups}


async def count(group: str) -> int:
    """Members of ``group`` on every live node (as of their last heartbeats)."""
    return sum(groups.get(group, 0) for groups in (await presence(group)).values())
