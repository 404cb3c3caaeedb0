"""The cluster node this process runs (one at most), where broadcasts and addresses find it.

Kept apart from the node itself so that ``pywsserver.groups`` and the worker
can look it up without importing the Redis client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._node import ClusterNode

__all__ = ["current"]

#: The running node, or ``None`` (no ``cluster`` option, or the server stopped).
current: ClusterNode | None = None

#: Set by the supervising parent of ``processes`` in each server process it forks without a cluster:
#: broadcasts stay within that process, which the first broadcast warns about.
island_processes: int = 0
