"""A connection's cluster-wide address: the node it runs on, that node's run, and its connection id."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import attrs

from . import _state

if TYPE_CHECKING:
    from .._worker import Worker

__all__ = ["Address", "address_of", "local_worker"]

#: The workers whose address was asked for, by connection id: what a send from another node looks up.
#: Weak values: an address does not keep its connection's worker alive.
_workers: weakref.WeakValueDictionary[int, Worker] = weakref.WeakValueDictionary()


@attrs.frozen
class Address:
    """Where one connection can be reached from any node: ``str(address)`` and `Address.parse` round-trip.

    ``run`` names one run of the node: after the node restarts, addresses
    made before answer "gone" instead of reaching a new connection that
    happens to get the same id. Without a cluster, ``node`` and ``run`` are
    empty and the address is good within this process.
    """

    #: The node's name (``cluster.node``), empty without a cluster.
    node: str
    #: The node's run: a random token drawn when the node started.
    run: str
    #: The connection's id on that node (``worker.connection_id``).
    connection_id: int

    def __str__(self) -> str:
        return f"{self.node}/{self.run}/{self.connection_id}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """The address whose ``str`` is ``text`` (``"node/run/id"``); `ValueError` if it is not one."""
        if isinstance(text, str):
            node, _, rest = text.partition("/")
            run, _, number = rest.partition("/")
            if number.isascii() and number.isdigit() and "/" not in number:
                return cls(node, run, int(number))
        raise ValueError(f"not a connection address (node/run/id): {text!r}")


def address_of(worker: Worker) -> Address:
    """``worker``'s address; from now on, sends from other nodes can find it."""
    _workers[worker.connection_id] = worker
    node = _state.current
    if node is None:
        return Address("", "", worker.connection_id)
    return Address(node.name, node.run, worker.connection_id)


def local_worker(connection_id: int) -> Worker | None:
    """The worker of a connection of this process whose address was handed out, if it still runs."""
    return _workers.get(connection_id)
