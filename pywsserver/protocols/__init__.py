"""Protocol modules: sans-I/O state machines a worker runs, one at a time, on its connection.

The contract (what the worker calls, the effects a module returns, the
actions from the mailbox) is in `pywsserver.protocols._contract` and
documented in ``docs/protocol-modules.md``. The built-in modules are
`HTTPProtocol` (``"http"``, the opening handshake) and
`WebSocketProtocol` (``"websocket"``, RFC 6455 on wsproto).
"""

from ._contract import (
    Action,
    BroadcastAction,
    CloseAction,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    Effect,
    GoingAway,
    Headers,
    PingAction,
    ProtocolModule,
    ProtocolModuleType,
    SendAction,
    SetTimer,
    Stop,
    Switch,
    TLSInfo,
    Write,
)
from ._http import HTTPOptions, HTTPProtocol, Request, accept_key, parse_request_head
from ._websocket import WebSocketOptions, WebSocketProtocol, encode_message

BUILTIN_MODULES: dict[str, type] = {"http": HTTPProtocol, "websocket": WebSocketProtocol}
"""The protocol modules known by their short names."""

__all__ = [
    "BUILTIN_MODULES",
    "Action",
    "BroadcastAction",
    "CloseAction",
    "CloseSocket",
    "ConnectionInfo",
    "Deliver",
    "Effect",
    "GoingAway",
    "HTTPOptions",
    "HTTPProtocol",
    "Headers",
    "PingAction",
    "ProtocolModule",
    "ProtocolModuleType",
    "Request",
    "SendAction",
    "SetTimer",
    "Stop",
    "Switch",
    "TLSInfo",
    "WebSocketOptions",
    "WebSocketProtocol",
    "Write",
    "accept_key",
    "encode_message",
    "parse_request_head",
]
