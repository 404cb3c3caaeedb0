"""The HTTP protocol module: the opening handshake, then a switch to the WebSocket module.

Theory of operation
-------------------
The module has three states, all in :meth:`HTTPProtocol.data_received`:

* ``READING``: request bytes are buffered until the blank line ending the
  head (at most ``max_request_size`` bytes, else 431). A handshake timer runs
  from :meth:`start`; when it expires the connection is closed without a word.
* the head is parsed and checked against RFC 6455 section 4.2.1 (GET,
  HTTP/1.1, ``Host``, ``Upgrade: websocket`` and ``Connection: upgrade`` as
  case-insensitive tokens, a 16-byte base64 ``Sec-WebSocket-Key``, version 13).
  A request that fails answers with an HTTP error and ``DONE``:
  400 (malformed), 405 (not GET), 426 with ``Upgrade: websocket`` (no upgrade
  asked for), 426 with ``Sec-WebSocket-Version: 13`` (another version).
* on success it answers 101 and switches the worker to ``upgrade_to`` (the
  WebSocket module by default), handing over any bytes that followed the head
  and the parsed request in the context.

No socket, no clock: bytes in, effects out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import unquote

import attrs

from .._optionkit import OptionError, as_mapping, check_int, check_number, join
from ._contract import (
    Action,
    CloseSocket,
    ConnectionInfo,
    Effect,
    GoingAway,
    Headers,
    SetTimer,
    Stop,
    Switch,
    Write,
)

__all__ = ["HTTPOptions", "HTTPProtocol", "Request", "accept_key", "parse_request_head"]

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")


@attrs.frozen
class Request:
    """A parsed HTTP request head."""

    #: ``GET``, ``POST``, ...
    method: str
    #: The request target as sent (path and query).
    target: str
    #: The decoded path, e.g. ``/chat/room 1``.
    path: str
    #: The raw query string without ``?`` (``""`` when absent).
    query: str
    #: ``(1, 1)`` for HTTP/1.1.
    version: tuple[int, int]
    #: The headers.
    headers: Headers


class BadRequest(Exception):
    """The request head cannot be parsed."""


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (without the final blank line); raises :class:`BadRequest`."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version_text = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("malformed method")
    if not version_text.startswith("HTTP/") or len(version_text) != 8 or version_text[6] != ".":
        raise BadRequest("malformed HTTP version")
    try:
        version = (int(version_text[5]), int(version_text[7]))
    except ValueError:
        raise BadRequest("malformed HTTP version") from None
    if not target or any(c in target for c in " \t\x00"):
        raise BadRequest("malformed request target")
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(f"malformed header line {line[:40]!r}")
        raw.append((name, value.strip(" \t")))
    raw_path, _, query = target.partition("?")
    return Request(method, target, unquote(raw_path), query, version, Headers(raw))


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode("ascii")


def _tokens(headers: Headers, name: str) -> set[str]:
    return {token.strip().lower() for value in headers.get_all(name) for token in value.split(",")}


def http_response(status: int, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    """An HTTP/1.1 response with ``Connection: close`` (a WebSocket port serves one request)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    for name, value in headers or ():
        lines.append(f"{name}: {value}")
    if status != 101:
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@attrs.frozen
class HTTPOptions:
    """Options of the HTTP module (``protocol_modules.http``)."""

    #: Seconds the client has to complete its opening handshake.
    handshake_timeout: float = 10.0
    #: The largest request head accepted, in bytes (431 beyond).
    max_request_size: int = 16384
    #: The module the worker switches to after a successful handshake.
    upgrade_to: str = "websocket"


class HTTPProtocol:
    """The opening handshake (RFC 6455 section 4.2) as a protocol module."""

    name: ClassVar[str] = "http"
    handshake: ClassVar[bool] = True

    @classmethod
    def parse_options(cls, raw: Any, path: str) -> HTTPOptions:
        """Check ``handshake_timeout``, ``max_request_size`` and ``upgrade_to``."""
        options = as_mapping(raw, path, allowed=("handshake_timeout", "max_request_size", "upgrade_to"))
        result = HTTPOptions()
        if "handshake_timeout" in options:
            timeout = check_number(options["handshake_timeout"], join(path, "handshake_timeout"), minimum=0.001)
            assert timeout is not None
            result = attrs.evolve(result, handshake_timeout=timeout)
        if "max_request_size" in options:
            size = check_int(options["max_request_size"], join(path, "max_request_size"), minimum=256)
            result = attrs.evolve(result, max_request_size=size)
        if "upgrade_to" in options:
            target = options["upgrade_to"]
            if not isinstance(target, str) or not target:
                raise OptionError(join(path, "upgrade_to"), f"expected a protocol module name, got {target!r}")
            result = attrs.evolve(result, upgrade_to=target)
        return result

    def __init__(self, options: HTTPOptions, connection: ConnectionInfo) -> None:
        self.options = options
        self.connection = connection
        self._buffer = bytearray()
        self._done = False

    def start(self, data: bytes, context: Mapping[str, Any]) -> list[Effect]:
        """Start the handshake timer and handle any bytes already received."""
        effects: list[Effect] = [SetTimer("handshake", self.options.handshake_timeout)]
        if data:
            effects += self.data_received(data)
        return effects

    def data_received(self, data: bytes) -> list[Effect]:
        """Buffer the request head; answer it once complete."""
        if self._done:
            return []
        buffer = self._buffer
        search_from = max(len(buffer) - 3, 0)
        buffer += data
        end = buffer.find(b"\r\n\r\n", search_from)
        if end < 0:
            if len(buffer) > self.options.max_request_size:
                return self._fail(431, "request head too large")
            return []
        if end > self.options.max_request_size:
            return self._fail(431, "request head too large")
        head = bytes(buffer[:end])
        rest = bytes(buffer[end + 4 :])
        self._buffer = bytearray()
        try:
            request = parse_request_head(head)
        except BadRequest as error:
            return self._fail(400, str(error))
        return self._handshake(request, rest)

    def _handshake(self, request: Request, rest: bytes) -> list[Effect]:
        headers = request.headers
        if request.version < (1, 1):
            return self._fail(400, "WebSocket requires HTTP/1.1")
        if request.method != "GET":
            return self._fail(405, "WebSocket handshakes use GET", [("Allow", "GET")])
        if "host" not in headers:
            return self._fail(400, "missing Host header")
        if "websocket" not in _tokens(headers, "upgrade"):
            return self._fail(426, "this is a WebSocket endpoint", [("Upgrade", "websocket")])
        if "upgrade" not in _tokens(headers, "connection"):
            return self._fail(400, "the Connection header must contain 'upgrade'")
        versions = headers.get_all("sec-websocket-version")
        if versions != ["13"]:
            return self._fail(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
        keys = headers.get_all("sec-websocket-key")
        if len(keys) != 1 or not _valid_key(keys[0]):
            return self._fail(400, "missing or invalid Sec-WebSocket-Key")
        response = http_response(
            101,
            [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(keys[0]))],
        )
        self._done = True
        return [
            SetTimer("handshake", None),
            Write(response),
            Switch(self.options.upgrade_to, rest, {"request": request}),
        ]

    def _fail(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> list[Effect]:
        self._done = True
        body = (message + "\n").encode()
        all_headers = [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])]
        return [
            SetTimer("handshake", None),
            Write(http_response(status, all_headers, body)),
            CloseSocket(),
            Stop(f"handshake refused: {status} {message}"),
        ]

    def eof_received(self) -> list[Effect]:
        """The client left during the handshake."""
        self._done = True
        return [Stop("client left during the handshake")]

    def action(self, action: Action) -> list[Effect]:
        """Actions before the connection is established: only going away matters."""
        if isinstance(action, GoingAway):
            return self._fail(503, "server shutting down")
        return []

    def timer_expired(self, name: str) -> list[Effect]:
        """The handshake took too long: close without answering."""
        self._done = True
        return [CloseSocket(), Stop("opening handshake timed out")]

    def handler_returned(self, result: Any) -> list[Effect]:
        """The HTTP module calls no handler."""
        return []

    def handler_failed(self, error: BaseException) -> list[Effect]:
        """The HTTP module calls no handler."""
        return []


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
