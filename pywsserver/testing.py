"""Tools for testing code built on pywsserver: a server on a free port, a small client, a handler driver.

* `serve_for_test` starts a server on ``127.0.0.1`` and a free port for the duration of an
  ``async with`` block;
* `Client` is a small WebSocket client on anyio (so it runs on asyncio and trio, in the test's
  own event loop) over wsproto;
* `HandlerDriver` drives a handler module directly, without sockets or a server: ``init``, each
  message, the handshake hook and the close notice, with a stand-in worker that records what the
  handler sends.

Example (with pytest and anyio's plugin, ``@pytest.mark.anyio``)::

    async def test_echo():
        async with serve_for_test("my_app.handler") as server:
            async with await Client.connect(server, "/chat") as client:
                await client.send("hello")
                assert await client.receive() == "hello"
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from ._errors import ConnectionClosed
from ._handler import HandlerModule, call
from ._messages import (
    Accept,
    ConnectionClose,
    HandlerResult,
    Reject,
    normalize_decision,
    normalize_result,
)
from ._messages import Ping as PingMessage
from ._messages import Pong as PongMessage
from ._server import Server, start_link
from .protocols import Headers
from .protocols import Request as HTTPRequest

__all__ = ["Client", "HandlerDriver", "HandshakeRejected", "RecordingWorker", "serve_for_test"]


@contextlib.asynccontextmanager
async def serve_for_test(
    handler: Any = None,
    *,
    options: Any = None,
    websocket: Sequence[tuple[str, Any]] | Mapping[str, Any] = (),
    **top_level: Any,
) -> AsyncIterator[Server]:
    """Run a server on ``127.0.0.1`` and a free port for the block; yields its `Server`.

    Give either ``handler`` (any form ``handler_module`` accepts) with optional ``websocket`` module
    options and top-level options as keywords, or complete ``options`` (their ``port`` and ``host``
    are replaced). Example::

        async with serve_for_test(MyHandler, websocket=[("max_message_size", 1000)]) as server:
            ...
    """
    if options is None:
        if handler is None:
            raise TypeError("serve_for_test() needs a handler or complete options")
        ws_items = list(websocket.items()) if isinstance(websocket, Mapping) else list(websocket)
        options = [
            *top_level.items(),
            ("worker_options", [("protocol_modules", [("websocket", [("handler_module", handler), *ws_items])])]),
        ]
    elif handler is not None or websocket or top_level:
        raise TypeError("give serve_for_test() a handler (and option keywords) or complete options, not both")
    items = list(options.items()) if isinstance(options, Mapping) else list(options)
    items = [(key, value) for key, value in items if key not in ("port", "host")]
    async with start_link([("host", "127.0.0.1"), ("port", 0), *items]) as server:
        yield server


class HandshakeRejected(Exception):
    """The server refused the opening handshake with an HTTP response."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"the server answered {status}: {body[:80]!r}")
        #: The HTTP status.
        self.status = status
        #: The response headers.
        self.headers = headers
        #: The response body.
        self.body = body


class Client:
    """A small WebSocket client for tests, in the test's own event loop (asyncio or trio).

    Messages arrive whole; pings from the server are answered. Use `connect`, then
    `send`, `receive` and `close`, or ``async with`` to close at the end.
    """

    def __init__(self, stream: anyio.abc.SocketStream, connection: WSConnection) -> None:
        self._stream = stream
        self._ws = connection
        self._events: list[Event] = []
        self._parts: list[str | bytes] = []
        #: The subprotocol the server chose, or ``None``.
        self.subprotocol: str | None = None
        #: The extensions the server agreed (``["permessage-deflate"]`` when compression is on).
        self.extensions: list[str] = []
        #: The 101 response's headers (case-insensitive: ``client.response_headers["x-user"]``).
        self.response_headers = Headers()
        #: ``(code, reason)`` once the connection has closed, else ``None``.
        self.close_code: tuple[int, str] | None = None
        #: Pongs received, in order.
        self.pongs: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        server: Server | int,
        path: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        compression: bool = False,
        timeout: float = 10,
    ) -> Client:
        """Open a connection to ``server`` (a `Server` or a port on 127.0.0.1) at ``path``.

        Raises `HandshakeRejected` when the server answers with an HTTP error.
        """
        port = server if isinstance(server, int) else server.port
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            connection = WSConnection(ConnectionType.CLIENT)
            extensions = [PerMessageDeflate()] if compression else []
            request = Request(
                host=f"127.0.0.1:{port}",
                target=path,
                extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                subprotocols=list(subprotocols),
                extensions=extensions,
            )
            client = cls(stream, connection)
            try:
                await stream.send(connection.send(request))
                event = await client._next_event()
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        if isinstance(event, AcceptConnection):
            client.subprotocol = event.subprotocol
            client.extensions = [e.name for e in event.extensions if hasattr(e, "name")]
            client.response_headers = Headers([(k.decode(), v.decode()) for k, v in event.extra_headers])
            return client
        status, reply_headers, body = 0, [], b""
        if isinstance(event, RejectConnection):
            status = event.status_code
            reply_headers = [(k.decode(), v.decode()) for k, v in event.headers]
            more = event.has_body
            while more:
                data = await client._next_event()
                if not isinstance(data, RejectData):
                    break
                body += data.data
                more = not data.body_finished
        await anyio.aclose_forcefully(stream)
        raise HandshakeRejected(status, reply_headers, body)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.close_code is None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.close()
        await anyio.aclose_forcefully(self._stream)

    async def send(self, data: str | bytes) -> None:
        """Send a message: ``str`` as text, ``bytes`` as binary."""
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=bytes(data))
        await self._send(event)

    async def ping(self, data: bytes = b"") -> None:
        """Send a ping; its pong lands in `pongs`."""
        await self._send(Ping(payload=data))

    async def receive(self, timeout: float = 10) -> str | bytes:
        """The next whole message; raises `ConnectionClosed` (with ``close_code`` set) once closed."""
        with anyio.fail_after(timeout):
            while True:
                event = await self._next_event()
                if event is None or isinstance(event, CloseConnection):
                    raise ConnectionClosed(f"the server closed the connection: {self.close_code}")
                if isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        parts, self._parts = self._parts, []
                        return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]

    async def close(self, code: int = 1000, reason: str = "") -> tuple[int, str]:
        """Start the closing handshake; return the server's ``(code, reason)`` once the connection is closed."""
        if self.close_code is None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self._send(CloseConnection(code=code, reason=reason))
            with anyio.fail_after(10):
                while self.close_code is None:
                    event = await self._next_event()
                    if event is None:
                        break
        await anyio.aclose_forcefully(self._stream)
        return self.close_code or (1006, "")

    async def _send(self, event: Event) -> None:
        await self._stream.send(self._ws.send(event))

    async def _next_event(self) -> Event | None:
        while not self._events:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                if self.close_code is None:
                    self.close_code = (1006, "")
                return None
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, Ping):
                    await self._send(event.response())
                elif isinstance(event, Pong):
                    self.pongs.append(bytes(event.payload))
                elif isinstance(event, CloseConnection):
                    self.close_code = (event.code, event.reason or "")
                    with contextlib.suppress(Exception):  # answer it, if wsproto lets us
                        await self._send(event.response())
                    self._events.append(event)
                else:
                    self._events.append(event)
        return self._events.pop(0)


class RecordingWorker:
    """Stands in for a `Worker` under `HandlerDriver`: records what is sent."""

    def __init__(self) -> None:
        #: Every ``("send", data)``, ``("ping", data)`` and ``("close", (code, reason))``, in order.
        self.outbox: list[tuple[str, Any]] = []
        #: The groups joined (not the real registry: broadcast does not reach a driver).
        self.groups: set[str] = set()
        #: Whether the connection is open.
        self.alive = True
        self.connection_id = 0

    def _check(self) -> None:
        if not self.alive:
            raise ConnectionClosed("the driven connection is closed")

    async def send(self, data: str | bytes) -> None:
        """Record a message."""
        self.send_nowait(data)
        await anyio.lowlevel.checkpoint()

    def send_nowait(self, data: str | bytes) -> None:
        """Record a message."""
        self._check()
        self.outbox.append(("send", data))

    async def ping(self, data: bytes = b"") -> None:
        """Record a ping."""
        self._check()
        self.outbox.append(("ping", data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Record a close."""
        self._check()
        self.outbox.append(("close", (code, reason)))

    def join(self, group: str) -> None:
        """Record joining ``group``."""
        self.groups.add(group)

    def leave(self, group: str) -> None:
        """Record leaving ``group``."""
        self.groups.discard(group)

    def sent(self) -> list[str | bytes]:
        """The messages sent so far (without pings and closes)."""
        return [data for kind, data in self.outbox if kind == "send"]


class HandlerDriver:
    """Drive a handler module without sockets: ``init``, messages, the handshake hook, the close notice.

    Example::

        driver = HandlerDriver(ChatHandler, {"room": "lobby"}, path="/chat")
        await driver.open()
        assert await driver.handle("hi") == Reply("hi", driver.state)
        await driver.close()

    ``options`` are the handler options; ``init`` receives them with the same keys a server gives
    (``worker`` is a `RecordingWorker`, ``peer``, ``path``, ``headers``, ...). ``control_messages``
    is the WebSocket module's option of that name: as on a server, the client's pings and pongs
    (`ping`, `pong`) reach ``handle`` only when it is on.
    """

    def __init__(
        self,
        handler: Any,
        options: Mapping[str, Any] | None = None,
        *,
        path: str = "/",
        query: str = "",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        peer: tuple[str, int] = ("127.0.0.1", 50000),
        control_messages: bool = False,
    ) -> None:
        self.handler = HandlerModule(handler, "handler")
        #: Whether the client's pings and pongs reach ``handle`` (the WebSocket module's option).
        self.control_messages = control_messages
        #: The stand-in worker the handler sees as ``options["worker"]``.
        self.worker = RecordingWorker()
        #: The handler state after the last callback.
        self.state: Any = None
        self._object: Any = None
        self._closed = False
        raw_headers = [("Host", "127.0.0.1:8080"), *headers]
        target = path + (f"?{query}" if query else "")
        request = HTTPRequest("GET", target, path, query, (1, 1), Headers(raw_headers))
        #: The dict ``init`` and ``handshake`` receive.
        self.info: dict[str, Any] = {
            **dict(options or {}),
            "worker": self.worker,
            "peer": peer,
            "local": ("127.0.0.1", 8080),
            "connection_id": 0,
            "path": path,
            "query": query,
            "headers": request.headers,
            "request": request,
            "params": {},
            "subprotocols": list(subprotocols),
            "subprotocol": None,
            "extensions": [],
            "tls": None,
            "secure": False,
        }

    def _target(self) -> Any:
        if self._object is None:
            self._object = self.handler.for_connection()
        return self._object

    async def handshake(self) -> Accept | Reject:
        """Run the ``handshake`` hook (an `Accept` when the handler has none)."""
        if not self.handler.has_handshake:
            return Accept()
        return normalize_decision(await call(self._target().handshake, dict(self.info)))

    async def open(self) -> Any:
        """Run ``init``; return (and keep) the state it returns."""
        self.state = await call(self._target().init, dict(self.info))
        return self.state

    async def handle(self, message: Any) -> HandlerResult:
        """Deliver ``message`` (``str``, ``bytes``, `Ping`, ...); return the normalised result.

        The state is kept for the next call; an invalid result raises `InvalidHandlerResult`.
        """
        self._check_open()
        result = normalize_result(await call(self._target().handle, message, self.state))
        self.state = result.state
        return result

    async def ping(self, data: bytes = b"") -> HandlerResult | None:
        """The client sends a ping: a `Ping` for ``handle`` if ``control_messages`` is on.

        As on a server, the ping is answered with a pong either way, and with
        ``control_messages`` off (the default) ``handle`` is not called: ``None``
        is returned. With it on, the result of ``handle(Ping(data), state)``.
        """
        if not self.control_messages:
            self._check_open()
            return None
        return await self.handle(PingMessage(data))

    async def pong(self, data: bytes = b"") -> HandlerResult | None:
        """The client sends a pong: a `Pong` for ``handle`` if ``control_messages`` is on (else ``None``)."""
        if not self.control_messages:
            self._check_open()
            return None
        return await self.handle(PongMessage(data))

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed("the driven connection is closed")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Tell the handler the connection closed (``ConnectionClose(code, reason)``), once."""
        if self._closed:
            return
        self._closed = True
        self.worker.alive = False
        await call(self._target().handle, ConnectionClose(code, reason), self.state)
