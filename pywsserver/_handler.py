"""Handler modules: resolving the user's handler and calling it, sync or async.

A handler module provides ``init(options)`` and ``handle(message, state)``,
and optionally ``handshake(info)``, which decides whether to accept a
connection before the server answers its opening handshake.
It may be given as:

* a Python module (its functions are called),
* a class (one instance is made per connection, its methods are called),
* an instance (shared by every connection; its methods are called),
* a ``"package.module:attr"`` (or ``"package.module"``) string naming one of those,
  or the path of a ``.py`` file (``"handlers/chat.py"``, ``"chat.py:Room"``).

Each callback may be a plain function or ``async``. Whether each can be
called with the arguments the server passes is checked at start, so that a
wrong signature fails there rather than at the first connection. A handler
given as ``threaded(handler)`` has its plain callbacks run in worker threads:
to the connection they are then async callbacks, which it already calls one
at a time and in order.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ._optionkit import OptionError, resolve_object

__all__ = ["HandlerModule", "ThreadedHandler", "threaded"]


def _describe(target: Any) -> str:
    if isinstance(target, types.ModuleType):
        return f"module {target.__name__!r}"
    if inspect.isclass(target):
        return f"class {target.__module__}.{target.__qualname__}"
    return f"instance of {type(target).__module__}.{type(target).__qualname__}"


#: The callbacks the server calls, with the arguments it passes.
_CALLBACKS = (("init", ("options",)), ("handle", ("message", "state")), ("handshake", ("info",)))


def _import(reference: str, path: str) -> Any:
    """Import a handler named ``package.module[:attr]``, or a ``.py`` file (``dir/my_handler.py[:attr]``)."""
    if not reference.strip():
        raise OptionError(path, "expected a handler: package.module, package.module:attr or a .py file, got ''")
    module_name, colon, attribute = reference.partition(":")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        file = Path(module_name)
        if not file.is_file():
            raise OptionError(
                path,
                f"no such file {module_name!r}; give a module name (package.module[:attr]) importable from"
                " the current directory, or the path of a .py file",
            )
        if file.suffix != ".py":
            raise OptionError(path, f"{module_name!r} is not a .py file; give a module name or a .py file")
        directory = str(file.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # the file's siblings import as they would when run as a script
        module_name = file.stem
    return resolve_object(module_name + colon + attribute, path)


def _check_signatures(target: Any, description: str, path: str) -> None:
    """Fail now if the server could not call the handler's callbacks (or make its instance) as it will."""
    if inspect.isclass(target):
        error = _call_error(target, "the class", ())
        if error is not None:
            raise OptionError(
                path, f"{description}: one instance is made per connection, with no argument, but {error}"
            )
    for name, parameters in _CALLBACKS:
        function = getattr(target, name, None)
        if function is None or not callable(function):
            continue
        arguments: tuple[str, ...] = parameters
        if inspect.isclass(target) and not isinstance(inspect.getattr_static(target, name), staticmethod | classmethod):
            arguments = ("self", *parameters)  # called on the instance made per connection
        error = _call_error(function, name, arguments)
        if error is not None:
            raise OptionError(path, f"{description}: the server calls {name}({', '.join(parameters)}), but {error}")


def _call_error(function: Any, name: str, arguments: tuple[str, ...]) -> str | None:
    """Why ``function`` cannot be called with ``arguments``, or ``None`` if it can (or cannot be told)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return None
    try:
        signature.bind(*arguments)
    except TypeError as error:
        shown = name if name != "the class" else "__init__"
        empty = inspect.Parameter.empty
        parameters = ", ".join(str(p.replace(annotation=empty)) for p in signature.parameters.values())
        return f"{shown}({parameters}) cannot take them: {error}"
    return None


class HandlerModule:
    """A resolved, checked handler module."""

    __slots__ = (
        "_per_connection",
        "async_handle",
        "async_handshake",
        "async_init",
        "has_handshake",
        "limiter",
        "name",
        "target",
    )

    target: Any
    limiter: anyio.CapacityLimiter | None

    def __init__(self, target: Any, path: str) -> None:
        limiter: anyio.CapacityLimiter | None = None
        if isinstance(target, HandlerModule):
            limiter = target.limiter
            target = target.target
        if isinstance(target, ThreadedHandler):
            limiter = target.limiter
            target = target.target
        if isinstance(target, str):
            target = _import(target, path)
        description = _describe(target)
        kind = "function" if isinstance(target, types.ModuleType) else "method"
        for required in ("init", "handle"):
            if not callable(getattr(target, required, None)):
                raise OptionError(path, f"{description} has no {kind} {required!r}")
        _check_signatures(target, description, path)
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
        #: The thread pool's bound when the handler is `threaded` (its sync callbacks then run in threads).
        self.limiter = limiter
        if limiter is not None:  # every callback is awaited: the plain ones in a thread
            self.async_init = self.async_handle = True
            self.async_handshake = self.has_handshake

    def __repr__(self) -> str:
        return f"<HandlerModule {self.name}>"

    def for_connection(self) -> Any:
        """The object whose callbacks serve one connection."""
        handler = self.target() if self._per_connection else self.target
        if self.limiter is not None:
            return _InThreads(handler, self.limiter)
        return handler


class ThreadedHandler:
    """A handler whose plain (sync) callbacks run in worker threads; made by `threaded`."""

    __slots__ = ("limiter", "target")

    def __init__(self, target: Any, limiter: anyio.CapacityLimiter) -> None:
        #: The handler as given (module, class, instance or reference string).
        self.target = target
        #: Bounds how many callbacks run in threads at once, across every connection of the handler.
        self.limiter = limiter

    def __repr__(self) -> str:
        return f"<ThreadedHandler {self.target!r} ({self.limiter.total_tokens} threads)>"


def threaded(handler: Any, *, max_threads: int = 40) -> ThreadedHandler:
    """Run a handler's sync callbacks in worker threads, so that blocking code stalls no other connection.

    Give the result as the ``handler_module``::

        ("websocket", [("handler_module", threaded("myapp.handlers:Blocking", max_threads=20))])

    ``init``, ``handle`` and ``handshake`` defined with ``def`` then run
    in a thread of a pool of at most ``max_threads`` (shared by every
    connection of this handler); ``async def`` callbacks run on the event loop
    as before. The contract is unchanged: one call at a time per connection,
    in order, and the results are what the handler returns. Code in a thread
    must not call the worker's loop-side methods (``send_nowait``...): use
    the results, or the ``*_threadsafe`` methods.
    """
    if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
        raise ValueError(f"threaded(): 'max_threads' must be an int >= 1, got {max_threads!r}")
    return ThreadedHandler(handler, anyio.CapacityLimiter(max_threads))


class _InThreads:
    """Stands for a handler object: each sync callback becomes an async one run in a thread."""

    __slots__ = ("handle", "handshake", "init")

    def __init__(self, target: Any, limiter: anyio.CapacityLimiter) -> None:
        for name in ("init", "handle", "handshake"):
            function = getattr(target, name, None)
            if function is not None and not inspect.iscoroutinefunction(function):
                function = _in_thread(function, limiter)
            setattr(self, name, function)


def _in_thread(function: Callable[..., Any], limiter: anyio.CapacityLimiter) -> Callable[..., Any]:
    async def run(*args: Any) -> Any:
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)

    return run


async def call(function: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async callback and return its result."""
    result = function(*args)
    if inspect.isawaitable(result):
        return await result
    return result
