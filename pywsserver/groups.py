"""Process groups and broadcast: reach many workers (or gen servers) at once, like Erlang's ``pg``.

Example::

    from pywsserver import groups

    def init(options):
        groups.join("chat", options["worker"])   # left automatically when the connection ends
        return None

    def handle(message, state):
        if isinstance(message, str):
            groups.broadcast("chat", message)
        return ("noreply", state)

Group names are plain strings and messages plain ``str``/``bytes``, so that a
later backend can carry groups across processes and machines.
"""

from ._broadcast import BroadcastResult, broadcast, broadcast_threadsafe
from .supervision._groups import count, groups_of, join, leave, leave_all, members, which_groups

__all__ = [
    "BroadcastResult",
    "broadcast",
    "broadcast_threadsafe",
    "count",
    "groups_of",
    "join",
    "leave",
    "leave_all",
    "members",
    "which_groups",
]
