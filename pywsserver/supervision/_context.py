"""The running child's context: bounded, shielded cleanup.

Stopping a child is cancellation plus a deadline. The supervisor sets the
deadline from the child's ``shutdown`` value, then cancels the child's scope.
A child that must clean up (a gen server's ``terminate``, a WebSocket worker's
closing handshake) does it inside `cleanup_scope`, which is shielded
from the cancellation but ends at that deadline: "ask it to stop, wait that
long, then cancel". ``brutal_kill`` leaves no time at all, ``infinity`` waits.
"""

from __future__ import annotations

import math
import weakref
from contextvars import ContextVar

import anyio

__all__ = ["ChildContext", "cleanup_scope", "current_child"]


class ChildContext:
    """What a supervised child knows about itself while it runs."""

    __slots__ = ("_cleanups", "child_id", "shutdown_seconds", "stop_deadline")

    def __init__(self, child_id: object, shutdown_seconds: float) -> None:
        #: The child's id in its supervisor.
        self.child_id = child_id
        #: The child's shutdown value in seconds (0 brutal_kill, inf infinity).
        self.shutdown_seconds = shutdown_seconds
        #: Set by the supervisor when it asks the child to stop.
        self.stop_deadline: float | None = None
        # The cleanup scopes the child opened, so that its supervisor can end them (made on first use).
        self._cleanups: weakref.WeakSet[anyio.CancelScope] | None = None

    def kill(self, now: float) -> None:
        """End the child's cleanup now: its supervisor's own shutdown time is up (OTP would kill it)."""
        self.stop_deadline = now
        for scope in list(self._cleanups or ()):
            scope.cancel()

    def _track(self, scope: anyio.CancelScope) -> anyio.CancelScope:
        if self._cleanups is None:
            self._cleanups = weakref.WeakSet()
        self._cleanups.add(scope)
        return scope


_current: ContextVar[ChildContext | None] = ContextVar("pywsserver_child", default=None)


def current_child() -> ChildContext | None:
    """The context of the supervised child running this task, if any."""
    return _current.get()


def _set_current(context: ChildContext) -> None:
    _current.set(context)


def cleanup_scope(default_timeout: float = 5.0) -> anyio.CancelScope:
    """A shielded cancel scope for cleanup, bounded by the supervisor's shutdown deadline.

    Use it around cleanup that must run even though the task is being
    cancelled::

        try:
            await serve()
        finally:
            with cleanup_scope():
                await connection.aclose()

    When the supervisor asked the child to stop, the scope ends at the
    deadline given by the child's ``shutdown`` value. Otherwise (the child is
    ending on its own, or runs outside any supervisor) it allows the child's
    shutdown time, or ``default_timeout`` seconds outside a supervisor.
    """
    context = _current.get()
    if context is None:
        return anyio.CancelScope(shield=True, deadline=anyio.current_time() + default_timeout)
    if context.stop_deadline is not None:
        deadline = context.stop_deadline
    elif math.isinf(context.shutdown_seconds):
        deadline = math.inf
    else:
        deadline = anyio.current_time() + context.shutdown_seconds
    return context._track(anyio.CancelScope(shield=True, deadline=deadline))
