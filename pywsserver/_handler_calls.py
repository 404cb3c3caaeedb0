"""The handler contract as the connection core runs it: handshake, ``init``, ``handle``, ``connection_close``.

Each delivery is written once, as a generator of *steps* (the callback to
call and its arguments) that returns the protocol module's next effects;
`_run_sync` runs the steps of a sync handler inside the driver's callback,
`_run_async` awaits those of an async one in the driver's task. The rules
kept here: ``init`` runs once per connection and hands the handler its worker;
a handler's exception or invalid result is reported (with the handler's name
and the value) and goes back to the module as ``handler_failed``;
``connection_close`` reaches the handler exactly once, and only if ``init``
succeeded; a closed connection leaves its groups before the handler hears of it.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from ._handler import HandlerModule, call
from ._messages import ConnectionClose, Handshake, Opened, Reject, normalize_decision, normalize_result
from ._options import ModuleConfig
from ._throttle import ThrottledReport
from .protocols import Effect, ProtocolModule
from .supervision import groups

__all__ = ["HandlerCalls", "bad_input"]

#: Reports of clients that send bad input: at most one line per kind every 10 s (see ``_throttle``).
bad_input = ThrottledReport(logging.getLogger("pywsserver.bad_input"))


class HandlerCalls:
    """The connection core's part that calls the handler (a base of `pywsserver._core.ConnectionCore`)."""

    # The handler's side of the connection (set by the core's __init__).
    __slots__ = (
        "_close",
        "_handler",
        "_handler_errors",
        "_handler_object",
        "_handler_state",
        "_messages_in",
        "_messages_out",
        "_opened",
        "_path",
        "_subprotocol",
        "_told_close",
    )

    _handler: HandlerModule | None
    _handler_object: Any
    _handler_state: Any
    _opened: bool  # init succeeded
    _told_close: bool  # connection_close was delivered
    # For the access log and the metrics.
    _messages_in: int  # messages handed to handle
    _messages_out: int  # broadcast frames written by the core (the module counts the rest)
    _handler_errors: int  # callbacks that raised or returned nonsense
    _path: str | None  # the path the connection was opened on
    _subprotocol: str | None
    _close: ConnectionClose | None  # the close the handler was told

    # Kept by the core.
    _debug: bool
    _frames_log: logging.LoggerAdapter | None  # type: ignore[type-arg]
    _module: ProtocolModule
    _module_config: ModuleConfig

    if TYPE_CHECKING:  # the core's

        @property
        def log(self) -> logging.LoggerAdapter: ...  # type: ignore[type-arg]

        @property
        def _peer_text(self) -> str: ...

        def _context(self) -> dict[str, Any]: ...

    def _needs_task(self, message: Any) -> bool:
        """Whether delivering ``message`` calls an ``async`` callback (so a task must run it)."""
        if isinstance(message, Opened):
            handler = message.handler or self._module_config.handler
            return handler is not None and handler.async_init
        if isinstance(message, Handshake):
            return bool(message.handler.async_handshake)
        if self._handler is None or not self._opened:
            return False
        if isinstance(message, ConnectionClose) and self._told_close:
            return False
        return self._handler.async_handle

    def _deliver_steps(self, message: Any) -> Steps:
        """Deliver ``message`` to the handler: yields each call to make, returns the module's next effects.

        Written once, run synchronously in the driver's callbacks (sync
        handlers, `_run_sync`) or awaited by a task (async handlers, `_run_async`).
        """
        module = self._module
        if isinstance(message, Handshake):
            return (yield from self._handshake_steps(message))
        if isinstance(message, Opened):
            handler = message.handler or self._module_config.handler
            if handler is None:
                return module.handler_failed(RuntimeError("no handler_module configured"))
            if message.handler is not None:
                options: dict[str, Any] = dict(message.info)
            else:
                options = dict(getattr(self._module_config.options, "handler_options", None) or {})
                options.update(message.info)
            options["worker"] = self
            self._path = message.info.get("path")
            self._subprotocol = message.info.get("subprotocol")
            try:
                if self._handler is not handler or self._handler_object is None:
                    self._handler_object = handler.for_connection()
                self._handler = handler
                self._handler_state = yield (self._handler_object.init, (options,))
            except Exception as error:
                self._report("raised in init", error)
                return module.handler_failed(error)
            self._opened = True
            if self._debug:
                self.log.debug("established")
            return module.handler_returned(None)
        if isinstance(message, ConnectionClose):
            if self._close is None:
                self._close = message
            groups.leave_all(self)  # a closed connection is no longer reachable through its groups
            if self._opened and not self._told_close:
                self._told_close = True
                try:
                    yield (self._handler_object.handle, (message, self._handler_state))
                except Exception as error:
                    self._report("raised in handle(connection_close)", error)
            return module.handler_returned(None)
        if not self._opened:
            return module.handler_failed(RuntimeError("message before init"))
        self._messages_in += 1
        if self._frames_log is not None:
            self._frames_log.debug("handle(%.200r)", message)
        try:
            raw = yield (self._handler_object.handle, (message, self._handler_state))
        except Exception as error:
            self._report(f"raised in handle({message!r:.80})", error)
            return module.handler_failed(error)
        try:
            result = normalize_result(raw)
        except TypeError as error:
            self._handler_errors += 1
            self.log.error("handler %s returned an invalid result: %s", self._handler_name, error)
            return module.handler_failed(error)
        self._handler_state = result.state
        return module.handler_returned(result)

    def _handle_sync(self, message: str | bytes) -> list[Effect]:
        """``handle`` for a text or binary message once ``init`` has run, the handler being sync.

        The same steps as `_deliver_steps` (and `_run_sync` around it) for such a message, without
        the generator between them. With the reply check first in ``normalize_result``, it took a
        64-byte echoed message from 85,000 to 72,000 instructions under callgrind
        (``benchmarks/instructions.py``).
        """
        module = self._module
        self._messages_in += 1
        if self._frames_log is not None:
            self._frames_log.debug("handle(%.200r)", message)
        try:
            raw = self._handler_object.handle(message, self._handler_state)
        except Exception as error:
            self._report(f"raised in handle({message!r:.80})", error)
            return module.handler_failed(error)
        return self._handled(message, raw)

    def _handled(self, message: str | bytes, raw: Any) -> list[Effect]:
        """What `_handle_sync` does once ``handle`` has returned ``raw`` (the core's fast path calls it too)."""
        module = self._module
        if type(raw) not in _NEVER_AWAITABLE and inspect.isawaitable(raw):
            close = getattr(raw, "close", None)
            if close is not None:
                close()
            try:
                raise TypeError(f"{self._handler_object.handle!r} returned an awaitable; declare it 'async def'")
            except TypeError as error:
                self._report(f"raised in handle({message!r:.80})", error)
                return module.handler_failed(error)
        try:
            result = normalize_result(raw)
        except TypeError as error:
            self._handler_errors += 1
            self.log.error("handler %s returned an invalid result: %s", self._handler_name, error)
            return module.handler_failed(error)
        self._handler_state = result.state
        return module.handler_returned(result)

    def _handshake_steps(self, message: Handshake) -> Steps:
        """Run the handler's ``handshake`` hook; the module gets an `Accept` or a `Reject`."""
        module = self._module
        handler = message.handler
        self._handler = handler
        info = dict(message.info)
        info["worker"] = self
        try:
            self._handler_object = handler.for_connection()  # the same object then serves the connection
            raw = yield (self._handler_object.handshake, (info,))
        except Exception as error:
            self._report("raised in handshake", error)
            return module.handler_failed(error)
        try:
            decision = normalize_decision(raw)
        except TypeError as error:
            self._handler_errors += 1
            self.log.error("handler %s returned an invalid handshake decision: %s", self._handler_name, error)
            return module.handler_failed(error)
        if isinstance(decision, Reject):
            self.log.debug("handshake rejected by %s with %d", self._handler_name, decision.status)
        return module.handler_returned(decision)

    @property
    def _handler_name(self) -> str:
        return self._handler.name if self._handler is not None else "?"

    def _report(self, what: str, error: BaseException) -> None:
        self._handler_errors += 1
        # Text only: a log record kept by a handler must not keep the traceback's frames (and this worker).
        self.log.error(
            "handler %s %s: %s\n%s",
            self._handler_name,
            what,
            repr(error),
            "".join(traceback.format_exception(error)).rstrip(),
        )


Steps = Generator[tuple[Callable[..., Any], tuple[Any, ...]], Any, list[Effect]]

_NEVER_AWAITABLE = frozenset((tuple, type(None), str, bytes, int, dict, list))


def _run_sync(steps: Steps) -> list[Effect]:
    """Run handler steps whose callbacks are plain functions."""
    try:
        function, args = next(steps)
        while True:
            try:
                result = function(*args)
                # What handlers return most (tuples, None) is never awaitable: no ABC check for it.
                if type(result) not in _NEVER_AWAITABLE and inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
                    raise TypeError(f"{function!r} returned an awaitable; declare it 'async def'")
            except Exception as error:
                function, args = steps.throw(error)
            else:
                function, args = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _run_async(steps: Steps) -> list[Effect]:
    """Run handler steps, awaiting callbacks that are ``async``."""
    try:
        function, args = next(steps)
        while True:
            try:
                result = await call(function, *args)
            except Exception as error:
                function, args = steps.throw(error)
            else:
                function, args = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
