"""Handler modules: resolving the user's handler and calling it, sync or async.

A handler module provides ``init(options)`` and ``handle(message, state)``,
and optionally ``handshake(info)``, which decides whether to accept a
connection before the server answers its opening handshake.
It may be given as:

* a Python module (its functions are called),
* a class (one instance is made per connection, its methods are called),
* an instance (shared by every connection; its methods are called),
* a ``"package.module:attr"`` (or ``"package.module"``) string naming one of those.

Each callback may be a plain function or ``async``.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from ._optionkit import OptionError, resolve_object

__all__ = ["HandlerModule"]


def _describe(target: Any) -> str:
    if isinstance(target, types.ModuleType):
        return f"module {target.__name__!r}"
    if inspect.isclass(target):
        return f"class {target.__module__}.{target.__qualname__}"
    return f"instance of {type(target).__module__}.{type(target).__qualname__}"


class HandlerModule:
    """A resolved, checked handler module."""

    __slots__ = ("_per_connection", "async_handle", "async_handshake", "async_init", "has_handshake", "name", "target")

    target: Any

    def __init__(self, target: Any, path: str) -> None:
        if isinstance(target, HandlerModule):
            target = target.target
        if isinstance(target, str):
            target = resolve_object(target, path)
        description = _describe(target)
        kind = "function" if isinstance(target, types.ModuleType) else "method"
        for required in ("init", "handle"):
            if not callable(getattr(target, required, None)):
                raise OptionError(path, f"{description} has no {kind} {required!r}")
        #: The module, class or instance as resolved.
        self.target = target
        #: How logs name the handler.
        self.name = (
            target.__name__
            if isinstance(target, types.ModuleType)
            else (target.__qualname__ if inspect.isclass(target) else type(target).__qualname__)
        )
        self._per_connection = inspect.isclass(target)
        #: Whether ``init`` / ``handle`` are ``async def`` (then a task runs them).
        self.async_init = inspect.iscoroutinefunction(target.init)
        self.async_handle = inspect.iscoroutinefunction(target.handle)
        hook = getattr(target, "handshake", None)
        if hook is not None and not callable(hook):
            raise OptionError(path, f"{description} has a 'handshake' attribute that is not callable")
        #: Whether the handler has the optional ``handshake(info)`` hook, and whether it is ``async def``.
        self.has_handshake = hook is not None
        self.async_handshake = inspect.iscoroutinefunction(hook)

    def __repr__(self) -> str:
        return f"<HandlerModule {self.name}>"

    def for_connection(self) -> Any:
        """The object whose callbacks serve one connection."""
        return self.target() if self._per_connection else self.target


async def call(function: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async callback and return its result."""
    result = function(*args)
    if inspect.isawaitable(result):
        return await result
    return result
