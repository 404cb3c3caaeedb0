"""Child specifications: the plain data a supervisor is built from.

A child spec says how to start one child (``start``, an async callable that
reports readiness through anyio's ``task_status.started(ref)``), when to
restart it (``restart``), how to stop it (``shutdown``), what it is
(``type``) and whether its own exit may end its supervisor (``significant``).
Specs are frozen attrs classes: they print, compare and hash like values, and
an invalid spec fails at construction naming the child and the field.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Literal, TypeAlias

import attrs

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "AutoShutdown",
    "ChildSpec",
    "ChildType",
    "Restart",
    "Shutdown",
    "StartFunction",
    "Strategy",
]


class Restart(enum.Enum):
    """When a terminated child is restarted (OTP's ``restart`` field)."""

    #: Always restarted, whatever the reason it ended.
    PERMANENT = "permanent"
    #: Restarted only after an abnormal exit (an exception other than
    #: `ShutdownRequested`).
    TRANSIENT = "transient"
    #: Never restarted, not even when a sibling's restart stopped it; its spec
    #: is forgotten once it ends.
    TEMPORARY = "temporary"


class ChildType(enum.Enum):
    """Whether a child is a plain worker or a supervisor of its own."""

    WORKER = "worker"
    SUPERVISOR = "supervisor"


class Strategy(enum.Enum):
    """How a supervisor reacts when one child must be restarted."""

    #: Restart only the child that ended.
    ONE_FOR_ONE = "one_for_one"
    #: Stop every other child (reverse start order), then restart them all in
    #: start order.
    ONE_FOR_ALL = "one_for_all"
    #: Stop the children started after the one that ended (reverse order),
    #: then restart it and them in start order.
    REST_FOR_ONE = "rest_for_one"
    #: A dynamic supervisor: many children started at run time from one
    #: template spec, each restarted on its own.
    SIMPLE_ONE_FOR_ONE = "simple_one_for_one"


class AutoShutdown(enum.Enum):
    """Whether significant children ending on their own stop the supervisor."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


BRUTAL_KILL: Literal["brutal_kill"] = "brutal_kill"
"""Shutdown value: cancel the child at once, with no time for its cleanup."""

INFINITY: Literal["infinity"] = "infinity"
"""Shutdown value: ask the child to stop and wait for it however long it takes."""

ShutdownValue: TypeAlias = float | Literal["brutal_kill", "infinity"]
StartFunction: TypeAlias = Callable[..., Awaitable[Any]]
"""An async callable ``start(*args, task_status=...)`` that calls
``task_status.started(ref)`` once it is ready and then runs until it ends."""


class Shutdown(Exception):
    """Raised by a child to end with the reason "shutdown".

    A child that raises it has exited *normally* in the sense of OTP: a
    ``transient`` child is not restarted and no crash is reported.
    """


def _child_label(spec: ChildSpec) -> str:
    return f"child spec {spec.id!r}"


def _check_start(spec: ChildSpec, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{_child_label(spec)}: field 'start' must be an async callable, got {value!r}")


def _check_shutdown(spec: ChildSpec, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value in (BRUTAL_KILL, INFINITY):
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or math.isnan(value):
        raise ValueError(
            f"{_child_label(spec)}: field 'shutdown' must be 'brutal_kill', 'infinity' "
            f"or a number of seconds >= 0, got {value!r}"
        )


def _to_enum(kind: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        return value  # left for the validator, which names the child


def _to_args(value: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(value)


def _to_restart(value: Any) -> Any:
    return _to_enum(Restart, value)


def _to_child_type(value: Any) -> Any:
    return _to_enum(ChildType, value)


def _enum_validator(kind: type[enum.Enum], field: str) -> Callable[[Any, Any, Any], None]:
    def check(spec: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, kind):
            allowed = ", ".join(repr(m.value) for m in kind)
            raise ValueError(f"{_child_label(spec)}: field '{field}' must be one of {allowed}, got {value!r}")

    return check


def _default_shutdown(spec: ChildSpec) -> ShutdownValue:
    return INFINITY if spec.type is ChildType.SUPERVISOR else 5.0


@attrs.frozen
class ChildSpec:
    """How a supervisor starts, restarts and stops one child.

    Example::

        async def ticker(interval, *, task_status):
            task_status.started()
            while True:
                await anyio.sleep(interval)

        spec = ChildSpec(id="ticker", start=ticker, args=(1.0,))

    ``restart`` and ``type`` accept the enum or its string value
    (``"transient"``); ``shutdown`` is ``"brutal_kill"``, ``"infinity"`` or a
    number of seconds (default 5 for workers, infinity for supervisors).
    """

    #: Identifies the child within its supervisor; must be hashable.
    id: Hashable
    #: ``async start(*args, task_status=...)``; calls ``task_status.started(ref)``.
    start: StartFunction = attrs.field(validator=_check_start)
    #: Positional arguments passed to ``start``.
    args: tuple[Any, ...] = attrs.field(default=(), converter=_to_args)
    #: When the child is restarted.
    restart: Restart = attrs.field(
        default=Restart.PERMANENT,
        converter=_to_restart,
        validator=_enum_validator(Restart, "restart"),
    )
    #: Worker or supervisor.
    type: ChildType = attrs.field(
        default=ChildType.WORKER,
        converter=_to_child_type,
        validator=_enum_validator(ChildType, "type"),
    )
    #: How long the child may take to stop once asked.
    shutdown: ShutdownValue = attrs.field(
        default=attrs.Factory(_default_shutdown, takes_self=True), validator=_check_shutdown
    )
    #: Whether this child ending on its own may end the supervisor
    #: (see `AutoShutdown`); only for transient or temporary children.
    significant: bool = False

    def __attrs_post_init__(self) -> None:
        try:
            hash(self.id)
        except TypeError:
            raise TypeError(f"child spec {self.id!r}: field 'id' must be hashable") from None
        if self.significant and self.restart is Restart.PERMANENT:
            raise ValueError(
                f"{_child_label(self)}: field 'significant' may be true only for a "
                "transient or temporary child, not a permanent one"
            )

    @property
    def shutdown_seconds(self) -> float:
        """The shutdown value as seconds: 0 for brutal_kill, ``math.inf`` for infinity."""
        if self.shutdown == BRUTAL_KILL:
            return 0.0
        if self.shutdown == INFINITY:
            return math.inf
        return float(self.shutdown)
