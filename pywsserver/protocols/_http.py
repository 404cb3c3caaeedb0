"""The HTTP protocol module: the opening handshake, then a switch to the WebSocket module.

Theory of operation
-------------------
The module has three states, all in `HTTPProtocol.data_received`:

* ``READING``: request bytes are buffered until the blank line ending the
  head (at most ``max_request_size`` bytes, else 431). A handshake timer runs
  from `start`; when it expires the connection is closed without a word.
* the head is parsed strictly (RFC 9112: a request line of three parts,
  header names that are tokens, no control character but HTAB in a header
  value, so no CR, bare LF or NUL; a request target of visible ASCII only;
  a path whose percent-decoding is UTF-8 without control characters and
  encodes no character that could have been sent as it is) and checked
  against RFC 6455 section 4.2.1 (GET, HTTP/1.1, ``Host``, ``Upgrade:
  websocket`` and ``Connection: upgrade`` as case-insensitive tokens, a
  16-byte base64 ``Sec-WebSocket-Key``, version 13, and no body: no
  ``Transfer-Encoding``, no ``Content-Length`` but 0).
  A request that fails answers with an HTTP error and ``DONE``:
  400 (malformed), 405 (not GET), 426 with ``Upgrade: websocket`` (no upgrade
  asked for), 426 with ``Sec-WebSocket-Version: 13`` (another version),
  505 (an HTTP major version other than 1).
* on success it answers 101 and switches the worker to ``upgrade_to`` (the
  WebSocket module by default), handing over any bytes that followed the head
  and the parsed request in the context.

No socket, no clock: bytes in, effects out.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn
from urllib.parse import unquote

import attrs

from .._messages import Accept, Handshake, Reject
from .._optionkit import OptionError, as_mapping, as_pairs, check_int, check_number, join
from ._contract import (
    Action,
    CloseSocket,
    ConnectionInfo,
    Deliver,
    Effect,
    GoingAway,
    Headers,
    SetTimer,
    Stop,
    Switch,
    Write,
)
from ._deflate import DeflateParameters, negotiate
from ._endpoint import WebSocketOptions, origin_allowed

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
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
# A whole header line: a token name, a colon, a value without control characters but HTAB (RFC 9110
# 5.5: so no CR, LF or NUL).
_HEADER_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9a-zA-Z]+):([^\x00-\x08\x0a-\x1f\x7f]*)").fullmatch
# RFC 9112 3.2: a request target is visible ASCII.
_BAD_TARGET = re.compile(r"[^\x21-\x7e]")
# Percent-encodings of what may appear in a path as it is (RFC 3986 unreserved characters and "/"):
# decoded, they would let "/%61dmin" reach "/admin" past a rule on the raw path.
_NEEDLESS_ESCAPE = re.compile(r"%(?:[46][1-9a-fA-F]|[57][0-9aA]|3[0-9]|2[dDeEfF]|5[fF]|7[eE])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
    """Parse a request head (without the final blank line); raises `BadRequest`."""
    if _parse_head is not None:
        # The common case in C (``_speedups.parse_head``), anything else (and every error) by the
        # Python parse below: 723,000 to 698,800 instructions per handshake under callgrind.
        parsed = _parse_head(head)
        if parsed is not None:
            method, target, path, query, version, raw, index = parsed
            headers = Headers.__new__(Headers)  # the index built already: not Headers.__init__'s loop
            headers.raw = raw
            headers._index = index
            return Request(method, target, path, query, version, headers)
    return parse_request_head_python(head)


def parse_request_head_python(head: bytes) -> Request:
    """`parse_request_head` in pure Python: what it does without the C speedup, and for every head
    the C parse leaves to it."""
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
    if not target or _BAD_TARGET.search(target):
        raise BadRequest("malformed request target")
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        # One regex call per well-formed line (name, colon, value without control characters), not a
        # partition and two (with the 101 template of `_upgrade`: 1,054,000 to 1,037,000 instructions
        # per handshake under callgrind, benchmarks/instructions.py --mode handshake).
        match = _HEADER_LINE(line)
        if match is None:
            _refuse_header_line(line)
        else:
            raw.append((match[1], match[2].strip(" \t")))
    raw_path, _, query = target.partition("?")
    return Request(method, target, decode_path(raw_path), query, version, Headers(raw))


#: The C parse's answer: method, target, path, query, version, the raw headers and their index.
_Parsed = tuple[str, str, str, str, tuple[int, int], tuple[tuple[str, str], ...], dict[str, list[str]]]
_parse_head: Callable[[bytes], _Parsed | None] | None
try:
    from .._speedups import parse_head as _parse_head
except ImportError:  # pragma: no cover - depends on the installation
    _parse_head = None


def _refuse_header_line(line: str) -> NoReturn:
    """Raise `BadRequest` saying what is wrong with a header line that `_HEADER_LINE` did not match."""
    name, colon, _ = line.partition(":")
    if not colon or not _TOKEN.fullmatch(name):
        raise BadRequest(f"malformed header line {line[:40]!r}")
    raise BadRequest(f"a control character in the value of header {name!r}")


def decode_path(raw_path: str) -> str:
    """The percent-decoded path that handlers see and routing matches; raises `BadRequest`.

    Refused: a decoding that is not UTF-8 or holds a control character (CR, LF,
    NUL, ...), and an escape of a character that may be sent as it is
    (``%61`` for ``a``, ``%2F`` for ``/``): the decoded path then holds no
    character that a rule on the raw path (in a proxy) would not have seen.
    """
    if "%" not in raw_path:
        return raw_path
    if _NEEDLESS_ESCAPE.search(raw_path):
        raise BadRequest("the path escapes a character that needs no escape")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the path is not UTF-8 once decoded") from None
    if _CONTROL.search(path):
        raise BadRequest("the decoded path holds a control character")
    return path


#: Stops the handshake timer: effects are frozen, so one serves every connection.
_NO_HANDSHAKE_TIMER = SetTimer("handshake", None)
#: The 101 answer's head up to the ``Sec-WebSocket-Accept`` value (what `http_response` makes for it).
_SWITCHING_HEAD = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return _accept_bytes(key).decode("ascii")


def _accept_bytes(key: str) -> bytes:
    # binascii's encoder called directly: base64.b64encode is a Python function around it.
    return binascii.b2a_base64(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest(), newline=False)


def _has_token(values: list[str] | None, token: str) -> bool:
    """Whether ``token`` (lower case) is among the comma-separated tokens of a header's ``values``
    (case-insensitive); ``None``: the header is absent."""
    if values is None:
        return False
    if len(values) == 1 and values[0].lower() == token:  # the usual single token: no set of tokens made
        return True
    return token in {item.strip().lower() for value in values for item in value.split(",")}


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
    #: A path answered ``200 OK`` to plain ``GET``/``HEAD`` requests, for load balancers (``None``: none).
    health_check_path: str | None = None
    #: Small static pages served to plain ``GET``/``HEAD`` requests: path -> (content type, body).
    pages: Mapping[str, tuple[str, bytes]] = attrs.field(factory=dict)
    #: A path answered with the server's Prometheus metrics to plain ``GET``/``HEAD`` requests (``None``: none).
    metrics_path: str | None = None
    #: What renders the metrics, as ``(content_type, body)`` (set by the server when metrics are on;
    #: the module itself does no I/O and keeps no metrics).
    metrics: Callable[[], tuple[str, bytes]] | None = attrs.field(default=None, eq=False, repr=False)
    #: The options of the ``upgrade_to`` module when it is the WebSocket module (set at ``start_link``):
    #: its resources, origins, subprotocols and compression are decided here, before the 101 answer.
    endpoint: WebSocketOptions | None = attrs.field(default=None, eq=False, repr=False)


class _Phase(enum.Enum):
    READING = "reading"
    DECIDING = "deciding"  # the handler's handshake hook is running
    DONE = "done"


# The members as module globals, read so in the per-connection paths: on Python 3.11 reading a
# member from its Enum class goes through ``EnumType.__getattr__`` (about 1,000 instructions under
# callgrind, a global read a few dozen; see `pywsserver._core`).
_READING, _DECIDING, _DONE = _Phase.READING, _Phase.DECIDING, _Phase.DONE


class HTTPProtocol:
    """The opening handshake (RFC 6455 section 4.2) as a protocol module."""

    name: ClassVar[str] = "http"
    handshake: ClassVar[bool] = True

    @classmethod
    def parse_options(cls, raw: Any, path: str) -> HTTPOptions:
        """Check ``handshake_timeout``, ``max_request_size``, ``upgrade_to`` and ``health_check_path``."""
        options = as_mapping(
            raw,
            path,
            allowed=(
                "handshake_timeout",
                "max_request_size",
                "upgrade_to",
                "health_check_path",
                "pages",
                "metrics_path",
            ),
        )
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
        if "health_check_path" in options:
            health = options["health_check_path"]
            if health is not None and (not isinstance(health, str) or not health.startswith("/")):
                raise OptionError(
                    join(path, "health_check_path"), f"expected a path such as '/healthz', got {health!r}"
                )
            result = attrs.evolve(result, health_check_path=health)
        if "pages" in options:
            result = attrs.evolve(result, pages=_parse_pages(options["pages"], join(path, "pages")))
        if options.get("metrics_path") is not None:
            metrics = options["metrics_path"]
            if not isinstance(metrics, str) or not metrics.startswith("/"):
                raise OptionError(join(path, "metrics_path"), f"expected a path such as '/metrics', got {metrics!r}")
            if metrics == result.health_check_path:
                raise OptionError(join(path, "metrics_path"), f"{metrics!r} is already the health_check_path")
            result = attrs.evolve(result, metrics_path=metrics)
        return result

    def __init__(self, options: HTTPOptions, connection: ConnectionInfo) -> None:
        self.options = options
        self.connection = connection
        self._buffer = bytearray()
        self._phase = _READING
        self._pending: _Pending | None = None
        #: The request, once its head is parsed (for the access log).
        self.request: Request | None = None
        #: The status answered, once answered (101 when the connection was upgraded).
        self.status: int | None = None

    def start(self, data: bytes, context: Mapping[str, Any]) -> list[Effect]:
        """Start the handshake timer and handle any bytes already received."""
        effects: list[Effect] = [SetTimer("handshake", self.options.handshake_timeout)]
        if data:
            effects += self.data_received(data)
        return effects

    def data_received(self, data: bytes) -> list[Effect]:
        """Buffer the request head; answer it once complete."""
        if self._phase is _DECIDING:
            # Frames the client sent right after its request: kept for the WebSocket module, within bounds.
            assert self._pending is not None
            self._pending.rest += data
            if len(self._pending.rest) > self.options.max_request_size:
                return self._fail(400, "data sent before the handshake's answer")
            return []
        if self._phase is not _READING:
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
        self.request = request
        return self._handshake(request, rest)

    def _handshake(self, request: Request, rest: bytes) -> list[Effect]:
        headers = request.headers
        # The values by lower-case name, read directly: each ``get_all`` would lower the name and copy
        # the list (8 of them per handshake).
        index: dict[str, list[str]] = headers._index
        if request.version[0] != 1:
            return self._fail(505, "only HTTP/1.1 is served")
        upgrade = _has_token(index.get("upgrade"), "websocket")
        health = self.options.health_check_path
        if not upgrade and health is not None and request.path == health and request.method in ("GET", "HEAD"):
            return self._respond(200, b"OK\n", head_only=request.method == "HEAD", reason="health check")
        metrics = self.options.metrics
        if not upgrade and request.path == self.options.metrics_path and metrics is not None:
            if request.method not in ("GET", "HEAD"):
                return self._fail(405, "the metrics are read with GET", [("Allow", "GET, HEAD")])
            try:
                content_type, body = metrics()
            except Exception:  # the renderer has logged why
                return self._fail(500, "the metrics could not be rendered")
            return self._respond(
                200, body, [("Content-Type", content_type)], head_only=request.method == "HEAD", reason="metrics"
            )
        page = self.options.pages.get(request.path) if not upgrade else None
        if page is not None and request.method in ("GET", "HEAD"):
            content_type, body = page
            return self._respond(
                200,
                body,
                [("Content-Type", content_type), ("Cache-Control", "no-cache")],
                head_only=request.method == "HEAD",
                reason=f"served page {request.path!r}",
            )
        if not upgrade:
            return self._fail(426, "this is a WebSocket endpoint", [("Upgrade", "websocket")])
        if request.version != (1, 1):
            return self._fail(400, "WebSocket requires HTTP/1.1")
        if request.method != "GET":
            return self._fail(405, "WebSocket handshakes use GET", [("Allow", "GET")])
        if "host" not in index:
            return self._fail(400, "missing Host header")
        if not _has_token(index.get("connection"), "upgrade"):
            return self._fail(400, "the Connection header must contain 'upgrade'")
        # A body would be read as WebSocket frames: none is allowed (Content-Length: 0 says there is none).
        lengths = index.get("content-length")
        if "transfer-encoding" in index or (lengths is not None and any(value != "0" for value in lengths)):
            return self._fail(400, "an upgrade request has no body")
        if index.get("sec-websocket-version") != ["13"]:
            return self._fail(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
        keys = index.get("sec-websocket-key")
        if keys is None or len(keys) != 1 or not _valid_key(keys[0]):
            return self._fail(400, "missing or invalid Sec-WebSocket-Key")
        protocols = index.get("sec-websocket-protocol")
        requested = [token for value in protocols for token in _token_list(value)] if protocols else []
        info = self.connection.handler_info()
        # Item by item: ``update(path=..., ...)`` would build a dict of its keywords first.
        info["path"] = request.path
        info["query"] = request.query
        info["headers"] = headers
        info["request"] = request
        info["params"] = {}
        info["subprotocols"] = requested
        info["subprotocol"] = None
        info["extensions"] = []
        pending = _Pending(request, keys[0], info, rest)
        endpoint = self.options.endpoint
        if endpoint is None:  # another module than ours: it gets the request, nothing is negotiated here
            return self._upgrade(pending, None)
        match = endpoint.router.match(request.path)
        if match is None:
            return self._fail(404, "no WebSocket resource at this path")
        origins = index.get("origin")
        if (origins is not None and len(origins) > 1) or not origin_allowed(origins[0] if origins else None, endpoint):
            return self._fail(403, "origin not allowed")
        route = match.route
        offered = route.subprotocols if route.subprotocols is not None else endpoint.subprotocols
        info["subprotocol"] = next((name for name in offered if name in requested), None)
        info["params"] = dict(match.params)
        if endpoint.compression is not None:
            offers = index.get("sec-websocket-extensions")
            pending.deflate = negotiate(offers, endpoint.compression) if offers else None
            if pending.deflate is not None:
                info["extensions"] = [pending.deflate.response]
        pending.handler = route.handler
        if route.handler_options:
            info.update({key: value for key, value in route.handler_options.items() if key not in info})
        if getattr(route.handler, "has_handshake", False):
            self._phase = _DECIDING
            self._pending = pending
            return [_NO_HANDSHAKE_TIMER, Deliver(Handshake(info, route.handler))]
        return self._upgrade(pending, None)

    def _upgrade(self, pending: _Pending, decision: Accept | None) -> list[Effect]:
        info = pending.info
        extra: tuple[tuple[str, str], ...] = ()
        if decision is not None:
            if decision.subprotocol is not None:
                if decision.subprotocol not in info["subprotocols"]:
                    return self._fail(
                        500, f"the handshake hook chose {decision.subprotocol!r}, which the client did not ask for"
                    )
                info["subprotocol"] = decision.subprotocol
            extra = decision.headers
        accept = _accept_bytes(pending.key)
        if info["subprotocol"] is None and pending.deflate is None and not extra:
            # The common answer: the precomputed head around the accept key, not a header list joined
            # and encoded per connection.
            response = _SWITCHING_HEAD + accept + b"\r\n\r\n"
        else:
            headers = [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", accept.decode("ascii")),
            ]
            if info["subprotocol"] is not None:
                headers.append(("Sec-WebSocket-Protocol", info["subprotocol"]))
            if pending.deflate is not None:
                headers.append(("Sec-WebSocket-Extensions", pending.deflate.response))
            headers.extend(extra)
            response = http_response(101, headers)
        self._phase = _DONE
        self._pending = None
        self.status = 101
        context = {"request": pending.request, "info": info, "handler": pending.handler, "deflate": pending.deflate}
        # No `_NO_HANDSHAKE_TIMER`: a Switch clears the module's timers (the protocol module contract);
        # one effect fewer per connection (see `_ON_CLOSED` in ``_websocket`` for the figure).
        return [Write(response), Switch(self.options.upgrade_to, bytes(pending.rest), context)]

    def _respond(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
        *,
        head_only: bool = False,
        reason: str,
        bad_input: bool = False,
    ) -> list[Effect]:
        """Answer with an HTTP response (``Connection: close``) and stop."""
        self._phase = _DONE
        self._pending = None
        self.status = status
        response = http_response(status, headers or [("Content-Type", "text/plain; charset=utf-8")], body)
        if head_only:
            response = response[: len(response) - len(body)]
        return [_NO_HANDSHAKE_TIMER, Write(response), CloseSocket(), Stop(reason, bad_input)]

    def _fail(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> list[Effect]:
        """Refuse the request; every refusal but "shutting down" (503) is reported as bad input."""
        all_headers = [("Content-Type", "text/plain; charset=utf-8"), *(headers or [])]
        return self._respond(
            status,
            (message + "\n").encode(),
            all_headers,
            reason=f"handshake refused: {status} {message}",
            bad_input=status != 503,
        )

    def eof_received(self) -> list[Effect]:
        """The client left during the handshake."""
        self._phase = _DONE
        return [Stop("client left during the handshake")]

    def action(self, action: Action) -> list[Effect]:
        """Actions before the connection is established: only going away matters."""
        if isinstance(action, GoingAway) and self._phase is not _DONE:
            return self._fail(503, "server shutting down")
        return []

    def timer_expired(self, name: str) -> list[Effect]:
        """The handshake took too long: close without answering."""
        if self._phase is not _READING:
            return []
        self._phase = _DONE
        return [CloseSocket(), Stop("opening handshake timed out", bad_input=True)]

    def handler_returned(self, result: Any) -> list[Effect]:
        """The handshake hook decided: answer 101 or the rejection."""
        pending = self._pending
        if self._phase is not _DECIDING or pending is None:
            return []
        if isinstance(result, Reject):
            self._phase = _DONE
            self._pending = None
            self.status = result.status
            body = result.body.encode() if isinstance(result.body, str) else result.body
            headers = list(result.headers)
            if body and not any(name.lower() == "content-type" for name, _ in headers):
                headers.insert(0, ("Content-Type", "text/plain; charset=utf-8"))
            return [
                Write(http_response(result.status, headers, body)),
                CloseSocket(),
                Stop(f"rejected: {result.status}"),
            ]
        return self._upgrade(pending, result if isinstance(result, Accept) else None)

    def handler_failed(self, error: BaseException) -> list[Effect]:
        """The handshake hook raised or returned nonsense: answer 500."""
        if self._phase is not _DECIDING:
            return []
        return self._fail(500, "internal error")


class _Pending:
    """A valid upgrade request waiting for its answer."""

    __slots__ = ("deflate", "handler", "info", "key", "request", "rest")

    def __init__(self, request: Request, key: str, info: dict[str, Any], rest: bytes) -> None:
        self.request = request
        self.key = key
        self.info = info
        self.rest = bytearray(rest)
        self.deflate: DeflateParameters | None = None
        self.handler: Any = None


def _parse_pages(raw: Any, path: str) -> dict[str, tuple[str, bytes]]:
    """``[(path, body)]`` or ``[(path, (content_type, body))]``; a ``str`` body is HTML in UTF-8."""
    pages: dict[str, tuple[str, bytes]] = {}
    for page_path, page in as_pairs(raw, path, "(path, page)"):
        where = join(path, str(page_path))
        if not isinstance(page_path, str) or not page_path.startswith("/"):
            raise OptionError(path, f"expected page paths such as '/', got {page_path!r}")
        content_type = "text/html; charset=utf-8"
        if isinstance(page, tuple) and len(page) == 2:
            content_type, page = page
            if not isinstance(content_type, str):
                raise OptionError(where, f"expected a content type such as 'text/html', got {content_type!r}")
        if isinstance(page, str):
            page = page.encode("utf-8")
        if not isinstance(page, bytes):
            raise OptionError(where, f"expected the page as str, bytes or (content_type, body), got {page!r}")
        pages[page_path] = (content_type, page)
    return pages


def _token_list(value: str) -> list[str]:
    return [token.strip() for token in value.split(",") if token.strip()]


def _valid_key(key: str) -> bool:
    try:
        # What base64.b64decode(..., validate=True) calls, without its Python layer.
        return len(binascii.a2b_base64(key.encode("ascii"), strict_mode=True)) == 16
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
