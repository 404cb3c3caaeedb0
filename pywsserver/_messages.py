"""The handler contract's values: the messages a handler receives and the results it returns.

``handle(message, state)`` receives ``str`` (a text message), ``bytes`` (a
binary message), `Ping`, `Pong` (control frames, when the
``control_messages`` option is on) or, once, `ConnectionClose`.

It returns one of the shapes of the original wsserver, as a tuple that reads
like the Erlang term or as one of the small result classes here:

=================================  ===================================
tuple                              class
=================================  ===================================
``("noreply", S)``                 ``NoReply(S)``
``("reply", Data, S)``             ``Reply(Data, S)``
``("ping", S)``                    ``SendPing(S)``
``("ping", Data, S)``              ``SendPing(Data, S)``
``("pong", S)``                    ``SendPong(S)``
``("pong", Data, S)``              ``SendPong(Data, S)``
``("close", S)``                   ``Close(S)``
``("close", Status, Payload, S)``  ``Close(Status, Payload, S)``
=================================  ===================================

`normalize_result` turns either form into the class, or raises
`InvalidHandlerResult` saying what was wrong.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeAlias, overload

import attrs

__all__ = [
    "Accept",
    "Close",
    "ConnectionClose",
    "HandlerResult",
    "Handshake",
    "InvalidHandlerResult",
    "NoReply",
    "Opened",
    "Ping",
    "Pong",
    "Reject",
    "Reply",
    "SendPing",
    "SendPong",
    "normalize_decision",
    "normalize_result",
    "valid_close_code",
]


# ---------------------------------------------------------------- messages


@attrs.frozen
class Ping:
    """The peer sent a ping (the server has already answered it with a pong)."""

    data: bytes = b""


@attrs.frozen
class Pong:
    """The peer sent a pong."""

    data: bytes = b""


@attrs.frozen
class ConnectionClose:
    """The connection has closed; the handler is told exactly once, whatever the reason.

    ``code`` is the close code received or sent (1006 when the connection was
    lost without a closing handshake) and ``reason`` its text.
    """

    code: int = 1006
    reason: str = ""


@attrs.frozen
class Opened:
    """Asks the worker to run the handler's ``init`` with ``info`` (the connection's details).

    ``handler`` is the handler module to use (a route's); ``None`` means the
    one configured for the protocol module.
    """

    info: dict[str, Any]
    handler: Any = None


@attrs.frozen
class Handshake:
    """Asks the worker to run the handler's optional ``handshake`` hook with ``info``, before the 101 answer.

    The worker answers the module with an `Accept` or a
    `Reject` (an `Accept` when the handler has no hook).
    """

    info: dict[str, Any]
    handler: Any


# ---------------------------------------------------- handshake decisions


@attrs.frozen
class Accept:
    """The ``handshake`` hook's "yes": optionally choose the subprotocol and add response headers.

    ``subprotocol`` must be one the client asked for (``None`` keeps the
    server's negotiated choice); ``headers`` are added to the 101 response.
    """

    subprotocol: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Reject:
    """The ``handshake`` hook's "no": the client gets this HTTP response instead of the upgrade.

    Example: ``Reject(401, "log in first", [("WWW-Authenticate", "Bearer")])``.
    """

    status: int = 403
    body: str | bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.status, int) or not 300 <= self.status <= 599:
            raise InvalidHandlerResult(f"a rejection's status must be an int from 300 to 599, got {self.status!r}")


def _header_pairs(headers: Any, what: str) -> tuple[tuple[str, str], ...]:
    if isinstance(headers, dict):
        headers = list(headers.items())
    try:
        pairs = tuple((str(name), str(value)) for name, value in headers)
    except (TypeError, ValueError):
        raise InvalidHandlerResult(f"{what} headers must be (name, value) pairs, got {headers!r}") from None
    for name, value in pairs:
        if not name or any(c in name for c in " :\r\n") or any(c in value for c in "\r\n"):
            raise InvalidHandlerResult(f"invalid {what} header {name!r}: {value!r}")
    return pairs


def normalize_decision(value: object) -> Accept | Reject:
    """The `Accept` or `Reject` for a ``handshake`` hook's return value.

    ``None`` and ``True`` accept; ``False`` rejects with 403; ``("accept",)``,
    ``("accept", Subprotocol)``, ``("reject", Status)`` and ``("reject",
    Status, Body)`` read like the original's terms.
    """
    if value is None or value is True:
        return Accept()
    if value is False:
        return Reject(403, b"")
    if isinstance(value, tuple) and value and value[0] == "accept" and len(value) <= 2:
        value = Accept(value[1] if len(value) == 2 else None)
    elif isinstance(value, tuple) and value and value[0] == "reject" and len(value) in (2, 3):
        value = Reject(value[1], value[2] if len(value) == 3 else b"")
    if isinstance(value, Accept):
        if value.subprotocol is not None and not isinstance(value.subprotocol, str):
            raise InvalidHandlerResult(f"the subprotocol must be a str, got {value.subprotocol!r}")
        return attrs.evolve(value, headers=_header_pairs(value.headers, "response"))
    if isinstance(value, Reject):
        if not isinstance(value.body, str | bytes):
            raise InvalidHandlerResult(f"a rejection's body must be str or bytes, got {value.body!r}")
        return attrs.evolve(value, headers=_header_pairs(value.headers, "rejection"))
    raise InvalidHandlerResult(
        "handshake() must return None, True, False, Accept(...), Reject(...), ('accept', ...) or ('reject', ...),"
        f" got {value!r}"
    )


# ----------------------------------------------------------------- results


@attrs.frozen
class NoReply:
    """Send nothing; keep ``state``."""

    state: Any


@attrs.frozen
class Reply:
    """Send ``data`` (``str`` as text, ``bytes`` as binary); keep ``state``."""

    data: str | bytes
    state: Any


_UNSET: Any = object()


def _shape_error(cls: str, args: tuple[Any, ...], shapes: str) -> TypeError:
    return TypeError(f"{cls} takes {shapes} (the order of the tuple form), got {len(args)} positional arguments")


@attrs.frozen(init=False)
class SendPing:
    """Send a ping carrying ``data``: ``SendPing(S)`` or ``SendPing(Data, S)``, as ``("ping", Data, S)``."""

    data: bytes
    state: Any

    @overload
    def __init__(self, state: Any, /) -> None: ...
    @overload
    def __init__(self, data: bytes | str, state: Any, /) -> None: ...
    @overload
    def __init__(self, *, state: Any, data: bytes | str = b"") -> None: ...

    def __init__(self, *args: Any, data: Any = b"", state: Any = _UNSET) -> None:
        data, state = _control_arguments("SendPing", args, data, state)
        self.__attrs_init__(data, state)


@attrs.frozen(init=False)
class SendPong:
    """Send an unsolicited pong carrying ``data``: ``SendPong(S)`` or ``SendPong(Data, S)``, as the tuple."""

    data: bytes
    state: Any

    @overload
    def __init__(self, state: Any, /) -> None: ...
    @overload
    def __init__(self, data: bytes | str, state: Any, /) -> None: ...
    @overload
    def __init__(self, *, state: Any, data: bytes | str = b"") -> None: ...

    def __init__(self, *args: Any, data: Any = b"", state: Any = _UNSET) -> None:
        data, state = _control_arguments("SendPong", args, data, state)
        self.__attrs_init__(data, state)


def _control_arguments(cls: str, args: tuple[Any, ...], data: Any, state: Any) -> tuple[Any, Any]:
    if len(args) == 1 and state is _UNSET:
        return data, args[0]
    if len(args) == 2 and state is _UNSET:
        return args[0], args[1]
    if not args and state is not _UNSET:
        return data, state
    raise _shape_error(cls, args, "(State), (Data, State) or keywords data= and state=")


@attrs.frozen(init=False)
class Close:
    """Close the connection with ``code`` and ``reason``, then stop the worker.

    ``Close(S)`` closes with 1000; ``Close(Code, Reason, S)`` reads as
    ``("close", Code, Reason, S)``. Keywords work too: ``Close(code=4000,
    reason="bye", state=S)``. The earlier ``Close(S, Code[, Reason])`` is still
    understood (its second argument is an int where the new form has the
    reason) but deprecated.
    """

    code: int
    reason: str
    state: Any

    @overload
    def __init__(self, state: Any, /) -> None: ...
    @overload
    def __init__(self, code: int, reason: str, state: Any, /) -> None: ...
    @overload
    def __init__(self, *, state: Any, code: int = 1000, reason: str = "") -> None: ...

    def __init__(self, *args: Any, code: Any = 1000, reason: Any = "", state: Any = _UNSET) -> None:
        if state is not _UNSET and not args:
            pass
        elif len(args) == 1 and state is _UNSET:
            state = args[0]
        elif len(args) in (2, 3) and _is_code(args[1]) and state is _UNSET:
            warnings.warn(
                "Close(state, code, reason) is deprecated: write Close(code, reason, state), the tuple's order",
                DeprecationWarning,
                stacklevel=2,
            )
            state, code = args[0], args[1]
            if len(args) == 3:
                reason = args[2]
        elif len(args) == 3 and state is _UNSET:
            code, reason, state = args
        else:
            raise _shape_error("Close", args, "(State), (Code, Reason, State) or keywords code=, reason= and state=")
        self.__attrs_init__(code, reason, state)


def _is_code(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


HandlerResult: TypeAlias = NoReply | Reply | SendPing | SendPong | Close


class InvalidHandlerResult(TypeError):
    """A handler returned something that is not one of the allowed shapes."""


_RESULT_TYPES = (NoReply, Reply, SendPing, SendPong, Close)
_SHAPES = (
    "('noreply', S), ('reply', Data, S), ('ping', S), ('ping', Data, S), ('pong', S), "
    "('pong', Data, S), ('close', S), ('close', Status, Payload, S) or a result class"
)


def valid_close_code(code: object) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455 section 7.4)."""
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999


def _control_payload(data: object, value: object) -> bytes:
    if isinstance(data, bytes):
        payload = data
    elif isinstance(data, str):
        payload = data.encode()
    else:
        raise InvalidHandlerResult(f"ping/pong data must be bytes or str, got {data!r} in {value!r}")
    if len(payload) > 125:
        raise InvalidHandlerResult(f"ping/pong data must be at most 125 bytes, got {len(payload)} in {value!r}")
    return payload


def normalize_result(value: object) -> HandlerResult:
    """The result class for a handler's return value, or `InvalidHandlerResult`."""
    # The commonest result first, with exact type checks (see HandlerCalls._handle_sync for the figure).
    if type(value) is tuple and len(value) == 3 and value[0] == "reply" and type(value[1]) in (str, bytes):
        return Reply(value[1], value[2])
    if isinstance(value, _RESULT_TYPES):
        result = value
    elif isinstance(value, tuple) and value and isinstance(value[0], str):
        tag, size = value[0], len(value)
        if tag == "noreply" and size == 2:
            result = NoReply(value[1])
        elif tag == "reply" and size == 3:
            result = Reply(value[1], value[2])
        elif tag == "ping" and size in (2, 3):
            result = SendPing(value[1] if size == 3 else b"", value[-1])
        elif tag == "pong" and size in (2, 3):
            result = SendPong(value[1] if size == 3 else b"", value[-1])
        elif tag == "close" and size == 2:
            result = Close(value[1])
        elif tag == "close" and size == 4:
            payload = value[2]
            if isinstance(payload, bytes):
                try:
                    payload = payload.decode()
                except UnicodeDecodeError:
                    raise InvalidHandlerResult(f"the close payload must be UTF-8, got {value!r}") from None
            result = Close(value[1], payload, value[3])
        else:
            raise InvalidHandlerResult(f"expected {_SHAPES}, got {value!r}")
    else:
        raise InvalidHandlerResult(f"expected {_SHAPES}, got {value!r}")
    if isinstance(result, Reply) and not isinstance(result.data, str | bytes):
        raise InvalidHandlerResult(f"reply data must be str or bytes, got {result.data!r}")
    if isinstance(result, SendPing | SendPong):
        payload = _control_payload(result.data, value)
        if payload is not result.data:
            result = type(result)(payload, result.state)
    if isinstance(result, Close):
        if not valid_close_code(result.code):
            raise InvalidHandlerResult(f"close status must be a valid close code (1000-1014, 3000-4999), got {value!r}")
        if not isinstance(result.reason, str) or len(result.reason.encode()) > 123:
            raise InvalidHandlerResult(f"close payload must be a str of at most 123 bytes, got {value!r}")
    return result
