"""The protocol module contract: what a worker feeds a protocol module and what it gets back.

Theory of operation
-------------------
A worker owns one connection and runs one protocol module at a time. The
module never touches a socket, a clock or an event loop: the worker calls it
with what happened and carries out the *effects* it returns, in order.

What the worker calls (each returns a list of effects):

* ``start(data, context)``: the module became current, at connection start or
  after another module's `Switch`; ``data`` is what the previous
  module received but did not consume.
* ``data_received(data)``: bytes from the peer.
* ``eof_received()``: the peer closed or reset the connection.
* ``action(action)``: a `SendAction`, `PingAction`,
  `CloseAction` or `GoingAway` from the worker's mailbox (that
  is, from ``send``/``ping``/``close`` callers or the server stopping). It
  must not return `Deliver`.
* ``timer_expired(name)``: a timer set with `SetTimer` ran out.
* ``handler_returned(result)`` / ``handler_failed(error)``: the outcome of the
  handler call a `Deliver` asked for.

The effects, mirroring the original's responses (``{reply, Bytes}``,
``{close, Bytes}``, ``{stop, Reason}``, switching modules): `Write`,
`CloseSocket`, `Stop`, `Switch`, `Deliver` and
`SetTimer`.

A module type is a class built as ``Module(options, connection)``, where
``options`` is what its ``parse_options(raw, path)`` class method returned at
``start_link`` (so bad options fail at start with their path) and
``connection`` the `ConnectionInfo`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeAlias, runtime_checkable

import attrs

__all__ = [
    "Action",
    "BroadcastAction",
    "CloseAction",
    "CloseSocket",
    "ConnectionInfo",
    "Deliver",
    "Effect",
    "GoingAway",
    "Headers",
    "PingAction",
    "ProtocolModule",
    "ProtocolModuleType",
    "SendAction",
    "SetTimer",
    "Stop",
    "Switch",
    "TLSInfo",
    "Write",
]


# ------------------------------------------------------------------ effects


@attrs.frozen
class Write:
    """Write ``data`` to the peer."""

    data: bytes


@attrs.frozen
class CloseSocket:
    """Close the socket (after the writes before it). The worker goes on to the next effect."""


@attrs.frozen
class Stop:
    """End the worker: close the socket if it is open and stop. ``reason`` is for the log.

    ``bad_input`` says the peer broke the protocol (a malformed or stalled handshake, or a frame
    the module closed the connection for): the worker reports it on the rate-limited
    ``pywsserver.bad_input`` logger, with ``reason`` escaped. A close the peer itself started is not
    bad input, whatever its code.
    """

    reason: str = "normal"
    bad_input: bool = attrs.field(default=False, eq=False)  # a reporting hint, not part of the effect's identity


@attrs.frozen
class Switch:
    """Make the module registered under ``module`` current, handing it ``data`` and ``context``."""

    module: str
    data: bytes = b""
    context: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Deliver:
    """Call the handler with ``message`` and report the outcome to the module.

    ``message`` is `Opened` for ``init``, or what goes to
    ``handle``. The worker answers with ``handler_returned(result)`` (the
    normalised result; ``None`` after ``init`` and after the connection-close
    notice) or ``handler_failed(error)``.
    """

    message: Any


@attrs.frozen
class SetTimer:
    """Start (or restart) the timer ``name`` for ``seconds``; ``None`` cancels it."""

    name: str
    seconds: float | None


Effect: TypeAlias = Write | CloseSocket | Stop | Switch | Deliver | SetTimer


# ------------------------------------------------------------------ actions


@attrs.frozen
class SendAction:
    """Send a message: ``str`` as a text frame, ``bytes`` as binary."""

    data: str | bytes


@attrs.frozen
class PingAction:
    """Send a ping with ``data``."""

    data: bytes = b""


@attrs.frozen
class CloseAction:
    """Start the closing handshake with ``code`` and ``reason``."""

    code: int = 1000
    reason: str = ""


@attrs.frozen
class GoingAway:
    """The server is stopping: close with 1001 (going away) and finish quickly."""


@attrs.frozen
class BroadcastAction:
    """Send ``data``, already encoded as the frame ``frame`` for every member of a broadcast.

    A module may write ``frame`` as is when its connection has no per-message
    state (such as compression), or encode ``data`` itself.
    """

    data: str | bytes
    frame: bytes


Action: TypeAlias = SendAction | PingAction | CloseAction | GoingAway | BroadcastAction


# ------------------------------------------------------------- connection


class Headers(Mapping[str, str]):
    """Request headers: case-insensitive lookup, raw order kept.

    ``headers["host"]`` gives the first value; `get_all` every value;
    `raw` the ``(name, value)`` pairs as received.
    """

    __slots__ = ("_index", "raw")

    def __init__(self, raw: Sequence[tuple[str, str]] = ()) -> None:
        #: The header lines as received, in order.
        self.raw: tuple[tuple[str, str], ...] = tuple(raw)
        index: dict[str, list[str]] = {}
        for name, value in self.raw:
            index.setdefault(name.lower(), []).append(value)
        self._index = index

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (empty list if absent)."""
        return list(self._index.get(name.lower(), ()))

    def __repr__(self) -> str:
        return f"Headers({list(self.raw)!r})"


@attrs.frozen
class TLSInfo:
    """The TLS session of a ``wss://`` connection."""

    #: The protocol version, e.g. ``"TLSv1.3"``.
    version: str | None
    #: The cipher's name, e.g. ``"TLS_AES_256_GCM_SHA384"``.
    cipher: str | None
    #: The client's certificate as `ssl.SSLSocket.getpeercert` gives it, or ``None`` when it sent none.
    peer_certificate: Mapping[str, Any] | None = None
    #: The server name the client asked for (SNI), when known.
    server_name: str | None = None


@attrs.frozen
class ConnectionInfo:
    """What the worker knows about its connection before any protocol runs."""

    #: The peer's address, ``(host, port)`` for TCP, or ``None`` when unknown.
    peer: tuple[str, int] | None
    #: The local address the connection arrived on.
    local: tuple[str, int] | None
    #: A number identifying the connection in logs, unique within the process.
    connection_id: int
    #: The TLS session, for ``wss://`` connections.
    tls: TLSInfo | None = None

    def handler_info(self) -> dict[str, Any]:
        """The entries of the handler's ``init`` options that come from the connection itself."""
        return {
            "peer": self.peer,
            "local": self.local,
            "connection_id": self.connection_id,
            "tls": self.tls,
            "secure": self.tls is not None,
        }


# --------------------------------------------------------------- behaviour


@runtime_checkable
class ProtocolModule(Protocol):
    """One connection's protocol state machine (see the module docstring)."""

    def start(self, data: bytes, context: Mapping[str, Any]) -> list[Effect]:
        """Become current; ``data`` is input left over by the previous module."""
        ...

    def data_received(self, data: bytes) -> list[Effect]:
        """Handle bytes from the peer."""
        ...

    def eof_received(self) -> list[Effect]:
        """The peer closed or reset the connection."""
        ...

    def action(self, action: Action) -> list[Effect]:
        """Handle an action from the mailbox."""
        ...

    def timer_expired(self, name: str) -> list[Effect]:
        """A timer set by `SetTimer` ran out."""
        ...

    def handler_returned(self, result: Any) -> list[Effect]:
        """The handler call asked for by `Deliver` returned ``result``."""
        ...

    def handler_failed(self, error: BaseException) -> list[Effect]:
        """The handler call raised, or returned something invalid."""
        ...


class ProtocolModuleType(Protocol):
    """A protocol module class: how the worker builds one and how its options are checked."""

    #: The short name the module is registered under (``"http"``, ``"websocket"``).
    name: ClassVar[str]
    #: Whether the module performs an opening handshake; the worker counts such
    #: modules as handshaking, not yet serving.
    handshake: ClassVar[bool]

    @classmethod
    def parse_options(cls, raw: Mapping[str, Any], path: str) -> Any:
        """Validate the module's options at ``start_link``; raise ``OptionError`` naming ``path``."""
        ...

    def __call__(self, options: Any, connection: ConnectionInfo) -> ProtocolModule:
        """Build the module for one connection."""
        ...
