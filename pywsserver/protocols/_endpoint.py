"""The WebSocket endpoint's options: what it serves, to whom, and with which protocol features.

These are the ``websocket`` module's options. The WebSocket module reads the
per-connection parts (limits, keepalive, timeouts); the HTTP module reads the
parts the opening handshake decides (resources, origins, subprotocols,
compression), so that a request is answered 404, 403 or 101 before any
WebSocket byte flows. Parsing happens once, at ``start_link``; every error
names the option's full path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .._handler import HandlerModule
from .._optionkit import OptionError, as_mapping, as_pairs, check_bool, check_int, check_number, join
from ._deflate import DeflateOptions
from ._routing import Route, Router, compile_pattern

__all__ = ["WebSocketOptions", "origin_allowed", "parse_websocket_options"]

_OPTIONS = (
    "handler_module",
    "handler_options",
    "resources",
    "subprotocols",
    "compression",
    "allowed_origins",
    "max_message_size",
    "max_fragments",
    "close_timeout",
    "control_messages",
    "ping_interval",
    "ping_timeout",
    "idle_timeout",
)
_ROUTE_OPTIONS = ("handler_module", "handler_options", "subprotocols")
_DEFLATE_OPTIONS = tuple(field.name for field in attrs.fields(DeflateOptions))


@attrs.frozen
class WebSocketOptions:
    """Options of the WebSocket module (``protocol_modules.websocket``), as parsed."""

    #: The handler module serving every path (or the resources that name none); ``None`` with resources only.
    handler_module: HandlerModule | None
    #: Extra entries for the ``init`` options mapping.
    handler_options: Mapping[str, Any] = attrs.field(factory=dict)
    #: Which paths are served, by which handler (see `pywsserver.protocols._routing`).
    router: Router = attrs.field(factory=Router, eq=False)
    #: The subprotocols spoken, in order of preference.
    subprotocols: tuple[str, ...] = ()
    #: permessage-deflate settings; ``None`` when compression is off.
    compression: DeflateOptions | None = attrs.field(factory=DeflateOptions)
    #: Origins allowed to connect, exact or ``scheme://*.domain`` (``None``: any origin).
    allowed_origins: tuple[str, ...] | None = None
    #: Whether a request without an ``Origin`` header is refused: true when ``allowed_origins`` is a list
    #: without ``None`` in it (put ``None`` in the list to let non-browser clients connect without one).
    require_origin: bool = False
    #: The largest message accepted, in bytes, after reassembly and decompression (1009 beyond).
    max_message_size: int = 1024 * 1024
    #: The most frames one message may come in (1009 beyond), empty continuation frames included.
    max_fragments: int = 4096
    #: Seconds to wait for the peer's close frame after sending ours.
    close_timeout: float = 10.0
    #: Whether pings and pongs from the peer reach ``handle`` as ``Ping``/``Pong`` (the original's behaviour);
    #: off by default, so that a handler replying with whatever it gets never replies with a ``Ping``.
    control_messages: bool = False
    #: Seconds between keepalive pings (``None``: no keepalive).
    ping_interval: float | None = 20.0
    #: Seconds a keepalive ping may wait for its pong before the connection is closed with 1011.
    ping_timeout: float | None = 20.0
    #: Seconds without any frame from the peer before the connection is closed with 1001 (``None``: never).
    idle_timeout: float | None = None


def _subprotocols(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise OptionError(path, f"expected a list of subprotocol names in order of preference, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item or any(c in item for c in ' ,;"\t'):
            raise OptionError(path, f"expected subprotocol names (tokens), got {item!r}")
    return tuple(value)


def _compression(value: Any, path: str) -> DeflateOptions | None:
    if value is None or value is False:
        return None
    if value is True or value == "deflate":
        return DeflateOptions()
    options = as_mapping(value, path, allowed=_DEFLATE_OPTIONS)
    fields: dict[str, Any] = {}
    for name in ("server_max_window_bits", "client_max_window_bits"):
        if name in options:
            fields[name] = check_int(options[name], join(path, name), minimum=9, maximum=15)
    if "memory_level" in options:
        fields["memory_level"] = check_int(options["memory_level"], join(path, "memory_level"), minimum=1, maximum=9)
    if "compression_level" in options:
        level = options["compression_level"]
        if level != -1:
            check_int(level, join(path, "compression_level"), minimum=0, maximum=9)
        fields["compression_level"] = level
    if "server_no_context_takeover" in options:
        fields["server_no_context_takeover"] = check_bool(
            options["server_no_context_takeover"], join(path, "server_no_context_takeover")
        )
    return DeflateOptions(**fields)


def _origins(value: Any, path: str) -> tuple[tuple[str, ...] | None, bool]:
    if value is None:
        return None, False
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise OptionError(path, f"expected a list of origins such as 'https://example.com', got {value!r}")
    origins: list[str] = []
    require = True
    for item in value:
        if item is None:
            require = False  # None in the list: requests without an Origin header are allowed
            continue
        if not isinstance(item, str) or "://" not in item:
            raise OptionError(
                path, f"expected origins such as 'https://example.com' or 'https://*.example.com', got {item!r}"
            )
        origins.append(item.lower().rstrip("/"))
    return tuple(origins), require


def origin_allowed(origin: str | None, options: WebSocketOptions) -> bool:
    """Whether a request with this ``Origin`` header value may connect."""
    allowed = options.allowed_origins
    if allowed is None:
        return True
    if origin is None:
        return not options.require_origin
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        if pattern == origin:
            return True
        scheme, _, host = pattern.partition("://")
        if host.startswith("*."):
            their_scheme, _, their_host = origin.partition("://")
            if their_scheme == scheme and their_host.endswith(host[1:]) and len(their_host) > len(host) - 1:
                return True
    return False


def _resources(value: Any, path: str, default: HandlerModule | None, default_options: Mapping[str, Any]) -> Router:
    entries = as_pairs(value, path, "(path, options)")
    routes: list[Route] = []
    seen: set[str] = set()
    for pattern, raw in entries:
        route_path = join(path, str(pattern))
        if not isinstance(pattern, str):
            raise OptionError(path, f"expected a path such as '/chat' or '/rooms/{{id}}', got {pattern!r}")
        if pattern in seen:
            raise OptionError(route_path, "configured twice")
        seen.add(pattern)
        try:
            regex = compile_pattern(pattern)
        except ValueError as error:
            raise OptionError(route_path, str(error)) from None
        if isinstance(raw, str) or not isinstance(raw, Mapping | list | tuple):
            raw = [("handler_module", raw)]  # ("/chat", chat_handler) is short for [("handler_module", ...)]
        options = as_mapping(raw, route_path, allowed=_ROUTE_OPTIONS)
        if "handler_module" in options:
            handler = HandlerModule(options["handler_module"], join(route_path, "handler_module"))
        elif default is not None:
            handler = default
        else:
            raise OptionError(
                join(route_path, "handler_module"), "required (no handler_module is configured for the module)"
            )
        handler_options = dict(default_options)
        if "handler_options" in options:
            handler_options.update(as_mapping(options["handler_options"], join(route_path, "handler_options")))
        subprotocols = None
        if "subprotocols" in options:
            subprotocols = _subprotocols(options["subprotocols"], join(route_path, "subprotocols"))
        routes.append(Route(pattern, handler, handler_options, subprotocols, regex))
    if not routes:
        raise OptionError(path, "expected at least one resource")
    return Router(routes)


def parse_websocket_options(raw: Any, path: str) -> WebSocketOptions:
    """Check the ``websocket`` module's options (see `WebSocketOptions`)."""
    options = as_mapping(raw, path, allowed=_OPTIONS)
    handler = None
    if "handler_module" in options:
        handler = HandlerModule(options["handler_module"], join(path, "handler_module"))
    handler_options: Mapping[str, Any] = {}
    if "handler_options" in options:
        handler_options = as_mapping(options["handler_options"], join(path, "handler_options"))
    fields: dict[str, Any] = {"handler_module": handler, "handler_options": handler_options}
    if "resources" in options:
        fields["router"] = _resources(options["resources"], join(path, "resources"), handler, handler_options)
    elif handler is None:
        raise OptionError(
            join(path, "handler_module"), "required: the module, class or instance handling messages (or resources)"
        )
    else:
        fields["router"] = Router(catch_all=Route(None, handler, handler_options))
    if "subprotocols" in options:
        fields["subprotocols"] = _subprotocols(options["subprotocols"], join(path, "subprotocols"))
    if "compression" in options:
        fields["compression"] = _compression(options["compression"], join(path, "compression"))
    if "allowed_origins" in options:
        fields["allowed_origins"], fields["require_origin"] = _origins(
            options["allowed_origins"], join(path, "allowed_origins")
        )
    if "max_message_size" in options:
        fields["max_message_size"] = check_int(options["max_message_size"], join(path, "max_message_size"), minimum=1)
    if "max_fragments" in options:
        fields["max_fragments"] = check_int(options["max_fragments"], join(path, "max_fragments"), minimum=1)
    if "close_timeout" in options:
        fields["close_timeout"] = check_number(options["close_timeout"], join(path, "close_timeout"))
    for name in ("ping_interval", "ping_timeout", "idle_timeout"):
        if name in options:
            fields[name] = check_number(options[name], join(path, name), minimum=0.001, allow_none=True)
    if "control_messages" in options:
        fields["control_messages"] = check_bool(options["control_messages"], join(path, "control_messages"))
    return WebSocketOptions(**fields)
