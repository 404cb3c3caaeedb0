"""The name registry: find a process by a name instead of a ref.

Like Erlang's local registration: one name, one process, for as long as the
process runs. Supervisors and gen servers given a ``name`` register at start
and unregister when they end, so a name always points at the live process
(after a restart, at the new one).
"""

from __future__ import annotations

from typing import Any

from ._errors import NameAlreadyRegistered, NotRunning

__all__ = ["register", "registered", "unregister", "whereis"]

_names: dict[str, Any] = {}


def register(name: str, process: Any) -> None:
    """Register ``process`` under ``name``; raises `NameAlreadyRegistered` if taken."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a process name must be a non-empty str, got {name!r}")
    if name in _names:
        raise NameAlreadyRegistered(name)
    _names[name] = process


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (no error if it is not registered)."""
    _names.pop(name, None)


def whereis(name: str) -> Any:
    """The process registered under ``name``, or ``None``."""
    return _names.get(name)


def registered() -> list[str]:
    """Every registered name."""
    return list(_names)


def resolve(target: Any) -> Any:
    """The process for a ref or a name; raises `NotRunning` for an unknown name."""
    if isinstance(target, str):
        process = _names.get(target)
        if process is None:
            raise NotRunning(f"no process is registered as {target!r}")
        return process
    return target
