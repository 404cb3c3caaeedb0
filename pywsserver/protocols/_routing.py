"""Resources: which paths a server serves, and with which handler.

A *resource* is a path pattern with its own handler module and handler
options. Patterns are exact paths (``/chat``) or paths with named segments
(``/rooms/{room}/users/{user}``), where ``{name}`` matches one non-empty path
segment (no ``/``) and is handed to the handler as ``params["name"]``. A
trailing ``{name*}`` matches the rest of the path, slashes included.

The `Router` tries exact paths first, then patterns in the order they
were configured; the first match wins. With no resources configured, one
catch-all route serves every path. Pure functions of the path: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Route", "RouteMatch", "Router", "compile_pattern"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")


def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """The regular expression for ``pattern``, or ``None`` when it is an exact path.

    Raises `ValueError` for a pattern that is not a path, repeats a
    name, or has ``{name*}`` anywhere but at its end.
    """
    if not pattern.startswith("/"):
        raise ValueError(f"a resource path must start with '/', got {pattern!r}")
    if "{" not in pattern and "}" not in pattern:
        return None
    parts: list[str] = []
    names: set[str] = set()
    position = 0
    for match in _PLACEHOLDER.finditer(pattern):
        literal = pattern[position : match.start()]
        if "{" in literal or "}" in literal:
            raise ValueError(f"malformed placeholder in {pattern!r}; expected {{name}} or {{name*}}")
        parts.append(re.escape(literal))
        name, rest = match.group(1), match.group(2)
        if name in names:
            raise ValueError(f"the placeholder {{{name}}} appears twice in {pattern!r}")
        names.add(name)
        if rest:
            if match.end() != len(pattern):
                raise ValueError(f"{{{name}*}} must end the pattern {pattern!r}")
            parts.append(f"(?P<{name}>.*)")
        else:
            parts.append(f"(?P<{name}>[^/]+)")
        position = match.end()
    literal = pattern[position:]
    if "{" in literal or "}" in literal:
        raise ValueError(f"malformed placeholder in {pattern!r}; expected {{name}} or {{name*}}")
    parts.append(re.escape(literal))
    return re.compile("".join(parts))


@attrs.frozen
class Route:
    """One served resource."""

    #: The pattern as configured (``None`` for the catch-all route).
    pattern: str | None
    #: The handler module serving it (a resolved `HandlerModule`).
    handler: Any
    #: Extra entries for the ``init`` options of its connections.
    handler_options: Mapping[str, Any] = attrs.field(factory=dict)
    #: The subprotocols it speaks, in order of preference (``None``: the module's list).
    subprotocols: tuple[str, ...] | None = None
    regex: re.Pattern[str] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class RouteMatch:
    """A route and the values of its placeholders for one request path."""

    route: Route
    params: Mapping[str, str]


class Router:
    """Finds the route for a path (see the module docstring)."""

    __slots__ = ("_exact", "_patterns", "catch_all")

    def __init__(self, routes: list[Route] | tuple[Route, ...] = (), catch_all: Route | None = None) -> None:
        self._exact: dict[str, Route] = {}
        self._patterns: list[Route] = []
        for route in routes:
            if route.regex is None:
                assert route.pattern is not None
                self._exact[route.pattern] = route
            else:
                self._patterns.append(route)
        #: The route serving every path when no resource is configured.
        self.catch_all = catch_all

    @property
    def routes(self) -> list[Route]:
        """Every configured resource, exact paths first."""
        return [*self._exact.values(), *self._patterns]

    def match(self, path: str) -> RouteMatch | None:
        """The route serving ``path`` with its parameters, or ``None`` (answer 404)."""
        route = self._exact.get(path)
        if route is not None:
            return RouteMatch(route, {})
        for route in self._patterns:
            assert route.regex is not None
            found = route.regex.fullmatch(path)
            if found is not None:
                return RouteMatch(route, found.groupdict())
        if self.catch_all is not None:
            return RouteMatch(self.catch_all, {})
        return None
