"""The cluster's errors (importable without the Redis client)."""

from __future__ import annotations

from .._errors import ServerStartError
from ..supervision import NameAlreadyRegistered

__all__ = ["ClusterStartError", "ClusterUnavailable", "NameRegisteredElsewhere"]


class ClusterUnavailable(ConnectionError):
    """Redis cannot be reached now, or the target node did not answer in time."""


class ClusterStartError(ServerStartError):
    """The cluster node could not start: Redis unreachable at start, or a second node in one process."""


class NameRegisteredElsewhere(NameAlreadyRegistered):
    """A name claimed cluster-wide is held by another node (``node``)."""

    def __init__(self, name: str, node: str | None) -> None:
        super().__init__(name)
        self.args = (f"the name {name!r} is already registered on node {node!r}",)
        #: The node holding the name (``None`` if it let it go in the meantime).
        self.node = node
