"""The cluster node this process runs (one at most), where broadcasts and addresses find it.

Kept apart from the node itself so that ``pywsserver.groups`` and the worker
can look it up without importing the Redis client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._node import ClusterNode

__all__ = ["ClusterStats", "current"]

#: The running node, or ``None`` (no ``cluster`` option, or the server stopped).
current: ClusterNode | None = None

#: Set by the supervising parent of ``processes`` in each server process it forks without a cluster:
#: broadcasts stay within that process, which the first broadcast warns about.
island_processes: int = 0


@attrs.define
class ClusterStats:
    """Counters of one node since it started (read them with ``pywsserver.cluster.stats()``)."""

    #: Messages published (broadcasts, sends, casts and answers): written, and answered by Redis.
    published: int = 0
    #: Messages written to Redis (the difference from ``published``: those awaiting Redis's answer).
    written: int = 0
    #: Publishes that failed: Redis down, the link lost with them queued, or the queue full.
    publish_failed: int = 0
    #: Broadcasts received from other nodes.
    received: int = 0
    #: Messages from the channel that did not decode (logged, dropped).
    malformed: int = 0
    #: Times the link to Redis was established (1 + reconnections).
    connections: int = 0
    #: Times the link was lost or a connection attempt failed.
    link_failures: int = 0
