"""Process groups, like Erlang's ``pg``: named sets of processes to reach together.

A process (a WebSocket worker, a gen server's ref, anything hashable) joins
and leaves groups by name; group names are plain strings, so a later backend
can carry them across processes and machines. The registry is process-wide
and guarded by a lock, so members can be read from any thread; joining and
leaving happen in the member's own event loop. Processes leave every group
when they end (workers when their connection closes, gen servers when they
stop): `leave_all` is what they call.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

__all__ = ["count", "groups_of", "join", "leave", "leave_all", "members", "which_groups"]

_lock = threading.Lock()
_groups: dict[str, dict[Hashable, None]] = {}  # group -> members, in join order
# member -> its groups: a list, as members are in few groups (an empty set is 216 bytes, a list 56)
_memberships: dict[Hashable, list[str]] = {}


def _check(group: str) -> None:
    if not isinstance(group, str) or not group:
        raise TypeError(f"a group name must be a non-empty str, got {group!r}")


def join(group: str, member: Hashable) -> None:
    """Add ``member`` to ``group`` (joining twice is a no-op)."""
    _check(group)
    with _lock:
        _groups.setdefault(group, {})[member] = None
        groups = _memberships.setdefault(member, [])
        if group not in groups:
            groups.append(group)


def leave(group: str, member: Hashable) -> None:
    """Remove ``member`` from ``group`` (no error if it is not a member)."""
    _check(group)
    with _lock:
        _remove(group, member)
        groups = _memberships.get(member)
        if groups is not None and group in groups:
            groups.remove(group)
            if not groups:
                del _memberships[member]


def _remove(group: str, member: Hashable) -> None:
    current = _groups.get(group)
    if current is not None:
        current.pop(member, None)
        if not current:
            del _groups[group]


def leave_all(member: Hashable) -> None:
    """Remove ``member`` from every group it is in."""
    with _lock:
        for group in _memberships.pop(member, ()):
            _remove(group, member)


def members(group: str) -> list[Hashable]:
    """The members of ``group``, in the order they joined (empty if the group has none)."""
    with _lock:
        return list(_groups.get(group, ()))


def count(group: str) -> int:
    """How many members ``group`` has."""
    with _lock:
        return len(_groups.get(group, ()))


def which_groups() -> list[str]:
    """Every group that has at least one member."""
    with _lock:
        return list(_groups)


def groups_of(member: Hashable) -> list[str]:
    """The groups ``member`` is in."""
    with _lock:
        return sorted(_memberships.get(member, ()))
