"""Errors of the supervision layer: the outcomes OTP reports as ``{error, Reason}``."""

from __future__ import annotations

from collections.abc import Hashable

from ._spec import Shutdown

__all__ = [
    "CallTimeout",
    "ChildAlreadyPresent",
    "ChildAlreadyStarted",
    "ChildNotFound",
    "ChildRestarting",
    "ChildRunning",
    "ChildStartError",
    "MailboxFull",
    "NameAlreadyRegistered",
    "NotRunning",
    "RestartIntensityExceeded",
    "SimpleOneForOneError",
    "SupervisionError",
    "SupervisorError",
]


class SupervisionError(Exception):
    """Base class of every error raised by the supervision layer."""


class SupervisorError(SupervisionError):
    """A dynamic supervisor call was made in a state that does not allow it."""


class ChildNotFound(SupervisorError):
    """No child with this id (or ref) is known to the supervisor."""

    def __init__(self, child_id: object) -> None:
        super().__init__(f"no child {child_id!r}")
        self.child_id = child_id


class ChildAlreadyStarted(SupervisorError):
    """``start_child`` with the id of a running child."""

    def __init__(self, child_id: Hashable, ref: object) -> None:
        super().__init__(f"child {child_id!r} is already started")
        self.child_id = child_id
        self.ref = ref


class ChildAlreadyPresent(SupervisorError):
    """``start_child`` with the id of a stopped child whose spec is kept."""

    def __init__(self, child_id: Hashable) -> None:
        super().__init__(f"child {child_id!r} is already present (stopped); restart or delete it")
        self.child_id = child_id


class ChildRunning(SupervisorError):
    """``restart_child`` or ``delete_child`` on a child that is running."""

    def __init__(self, child_id: Hashable) -> None:
        super().__init__(f"child {child_id!r} is running; terminate it first")
        self.child_id = child_id


class ChildRestarting(SupervisorError):
    """``restart_child`` or ``delete_child`` on a child whose restart failed and is being retried.

    OTP answers ``{error, restarting}``. `Supervisor.terminate_child` stops the retries.
    """

    def __init__(self, child_id: object) -> None:
        super().__init__(f"child {child_id!r} is being restarted (its last restart attempt failed)")
        self.child_id = child_id


class SimpleOneForOneError(SupervisorError):
    """A call a simple_one_for_one supervisor does not take (OTP: ``{error, simple_one_for_one}``).

    ``restart_child`` and ``delete_child`` on such a supervisor, and
    ``terminate_child`` with anything else than the `ChildHandle` of one of its children.
    """


class ChildStartError(SupervisorError):
    """A child raised, or returned, before reporting that it was ready."""

    def __init__(self, child_id: object, reason: BaseException) -> None:
        super().__init__(f"child {child_id!r} failed to start: {reason!r}")
        self.child_id = child_id
        self.reason = reason


class RestartIntensityExceeded(SupervisionError, Shutdown):
    """A supervisor restarted more often than its intensity allows, and gave up.

    Its children have all been stopped. As in OTP, a supervisor that gives up
    exits with the reason "shutdown": this error is a `Shutdown`, so a parent
    supervisor restarts the child supervisor only if its spec is permanent
    (not transient or temporary). At the top of a tree, `Supervisor.run`
    and `Supervisor.running` raise it to tell the caller the tree gave up.
    """

    def __init__(self, supervisor: str, child_id: object, reason: BaseException | None) -> None:
        super().__init__(
            f"supervisor {supervisor} gave up: restart intensity exceeded; "
            f"last child to fail was {child_id!r} with {reason!r}"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.reason = reason


class NotRunning(SupervisionError):
    """The process addressed (by ref or name) is not running."""


class MailboxFull(SupervisionError):
    """A cast or info message was refused because the process's mailbox is full."""


class CallTimeout(SupervisionError, TimeoutError):
    """No reply to a call arrived within its timeout; a later reply is dropped."""


class NameAlreadyRegistered(SupervisionError):
    """A process tried to register a name that another process holds."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the name {name!r} is already registered")
        self.name = name


def unwrap_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, else the group itself.

    Task groups wrap what escapes them; a supervisor's caller wants the
    `RestartIntensityExceeded` itself.
    """
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    return inner
