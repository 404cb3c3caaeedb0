"""The supervision core: OTP-style supervisors and gen servers on anyio.

This package is a library of its own: it imports nothing of the WebSocket
server, which is built from it. Users build their own trees with it too::

    from pywsserver.supervision import ChildSpec, Supervisor, Strategy

See ``docs/supervision.md`` for a guide and a reference of every name.
"""

from . import _groups as groups
from ._context import ChildContext, cleanup_scope, current_child
from ._errors import (
    CallTimeout,
    ChildAlreadyPresent,
    ChildAlreadyStarted,
    ChildNotFound,
    ChildRestarting,
    ChildRunning,
    ChildStartError,
    MailboxFull,
    NameAlreadyRegistered,
    NotRunning,
    RestartIntensityExceeded,
    SimpleOneForOneError,
    SupervisionError,
    SupervisorError,
)
from ._genserver import NO_REPLY, Caller, GenServer, ServerRef, call, cast, send_info
from ._registry import register, registered, unregister, whereis
from ._spec import (
    BRUTAL_KILL,
    INFINITY,
    AutoShutdown,
    ChildSpec,
    ChildType,
    Restart,
    Shutdown,
    StartFunction,
    Strategy,
)
from ._supervisor import ChildCounts, ChildHandle, ChildInfo, ChildState, Supervisor, add_observer, remove_observer

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "NO_REPLY",
    "AutoShutdown",
    "CallTimeout",
    "Caller",
    "ChildAlreadyPresent",
    "ChildAlreadyStarted",
    "ChildContext",
    "ChildCounts",
    "ChildHandle",
    "ChildInfo",
    "ChildNotFound",
    "ChildRestarting",
    "ChildRunning",
    "ChildSpec",
    "ChildStartError",
    "ChildState",
    "ChildType",
    "GenServer",
    "MailboxFull",
    "NameAlreadyRegistered",
    "NotRunning",
    "Restart",
    "RestartIntensityExceeded",
    "ServerRef",
    "Shutdown",
    "SimpleOneForOneError",
    "StartFunction",
    "Strategy",
    "SupervisionError",
    "Supervisor",
    "SupervisorError",
    "add_observer",
    "call",
    "cast",
    "cleanup_scope",
    "current_child",
    "groups",
    "register",
    "registered",
    "remove_observer",
    "send_info",
    "unregister",
    "whereis",
]
