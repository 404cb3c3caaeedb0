"""The servers the benchmark runs, each the same echo + broadcast service on 127.0.0.1.

``python benchmarks/servers.py NAME [PORT]`` starts one and prints ``ready PORT`` once it listens.
Every server echoes text as text and binary as binary; a text message ``go:COUNT:SIZE`` makes it
broadcast COUNT text messages of SIZE bytes to every connection (the sender included), the way
the server's own broadcast facility does it. Compression is off everywhere.

With ``BENCH_CERTFILE`` set (a PEM file holding the certificate chain and key; ``run.py`` makes one
for its TLS scenarios), the servers that can serve TLS do, with the same ``ssl.SSLContext`` settings:
`tls_context`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import sys
from typing import Any

MAX_SIZE = 16 * 1024 * 1024


def parse_go(message: str) -> tuple[int, str] | None:
    if not message.startswith("go:"):
        return None
    _, count, size = message.split(":")
    return int(count), "b" * int(size)


def ready(port: int) -> None:
    print(f"ready {port}", flush=True)


def tls_context() -> ssl.SSLContext | None:
    """The one server context every server gets under ``BENCH_CERTFILE`` (``None``: plain TCP).

    The defaults of ``ssl.SSLContext(PROTOCOL_TLS_SERVER)`` (TLS 1.2 and 1.3, no client certificate),
    as ``pywsserver``'s ``tls`` option builds from a ``certfile``.
    """
    certfile = os.environ.get("BENCH_CERTFILE")
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile)
    return context


# ----------------------------------------------------------------- pywsserver


class BenchHandler:
    """The benchmark's handler for pywsserver: echo, and broadcast on "go"."""

    def init(self, options: dict[str, Any]) -> None:
        options["worker"].join("bench")

    def handle(self, message: object, state: None) -> tuple[Any, ...]:
        if isinstance(message, str):
            go = parse_go(message)
            if go is not None:
                from pywsserver import broadcast

                count, payload = go
                for _ in range(count):
                    broadcast("bench", payload)
                return ("noreply", state)
            return ("reply", message, state)
        if isinstance(message, bytes):
            return ("reply", message, state)
        return ("noreply", state)


#: 10,000 clients connect at once (idle); PYWSSERVER_BENCH_METRICS=1 turns the Prometheus metrics on.
HTTP_OPTIONS: list[tuple[str, Any]] = [("handshake_timeout", 60)] + (
    [("metrics_path", "/metrics")] if os.environ.get("PYWSSERVER_BENCH_METRICS") == "1" else []
)


def pywsserver_options(port: int, keepalive: bool = True) -> list[tuple[str, Any]]:
    """The benchmark service's options; ``keepalive=False`` turns the WebSocket module's pings off."""
    tls = tls_context()
    return [
        *([("tls", tls)] if tls is not None else []),
        ("port", port),
        ("max_connections", 100_000),
        ("backlog", 4096),
        (
            "worker_options",
            [
                ("mailbox_size", 256),
                (
                    "protocol_modules",
                    [
                        ("http", HTTP_OPTIONS),
                        (
                            "websocket",
                            [
                                ("handler_module", BenchHandler),
                                ("max_message_size", MAX_SIZE),
                                ("control_messages", False),
                                *([] if keepalive else [("ping_interval", None)]),
                            ],
                        ),
                    ],
                ),
            ],
        ),
    ]


def run_pywsserver(port: int, backend: str, uvloop: bool, watchdog: bool = True, keepalive: bool = True) -> None:
    """pywsserver on ``backend``; ``watchdog=False`` turns the loop watchdog off (what it costs per message),
    ``keepalive=False`` the keepalive pings (and so the timer each connection keeps in the event loop)."""
    import anyio

    import pywsserver

    options = pywsserver_options(port, keepalive) + ([] if watchdog else [("loop_watchdog", None)])

    async def main() -> None:
        async with pywsserver.start_link(options) as server:
            ready(server.port)
            await anyio.Event().wait()  # not sleep_forever: a timer at +inf on asyncio

    backend_options = {"use_uvloop": True} if uvloop else {}
    anyio.run(main, backend=backend, backend_options=backend_options)


def run_pywsserver_without_tree(port: int) -> None:
    """pywsserver with its workers started in a plain task group instead of the worker supervisor.

    Only to measure what the supervision tree costs per connection (``docs/performance.md``): the
    acceptors hand connections to this task group; nothing restarts, counts or reports the workers.
    """
    import anyio

    import pywsserver
    from pywsserver._server import _run_worker

    async def main() -> None:
        async with pywsserver.start_link(pywsserver_options(port)) as server, anyio.create_task_group() as tg:

            def start_child_soon(connection: Any) -> None:
                tg.start_soon(functools.partial(_run_worker, task_status=anyio.TASK_STATUS_IGNORED), server, connection)

            server.worker_supervisor.start_child_soon = start_child_soon  # type: ignore[method-assign]
            ready(server.port)
            await anyio.Event().wait()  # not sleep_forever: a timer at +inf on asyncio

    anyio.run(main)


def run_pywsserver_processes(port: int, count: int, raw: list[tuple[str, Any]] | None = None) -> None:
    """pywsserver with ``processes=count``: each child prints ``ready PORT`` once it listens."""
    import anyio
    import attrs

    import pywsserver
    from pywsserver._options import parse_options
    from pywsserver._processes import run_processes

    options = attrs.evolve(parse_options(raw or pywsserver_options(port)), processes=count)

    def serve(child: Any) -> None:
        async def main() -> None:
            async with pywsserver.start_link(child) as server:
                ready(server.port)
                await anyio.Event().wait()  # not sleep_forever: a timer at +inf on asyncio

        anyio.run(main)

    run_processes(options, serve)


def run_pywsserver_cluster(port: int, count: int) -> None:
    """pywsserver with ``processes=count``, the processes one cluster on the Redis at ``BENCH_REDIS_URL``."""
    import os

    options = [*pywsserver_options(port), ("cluster", [("url", os.environ["BENCH_REDIS_URL"]), ("node", "bench")])]
    run_pywsserver_processes(port, count, options)


# ------------------------------------------------------------------ websockets


def run_websockets(port: int, uvloop: bool) -> None:
    from websockets.asyncio.server import broadcast, serve

    async def handler(ws: Any) -> None:
        async for message in ws:
            go = parse_go(message) if isinstance(message, str) else None
            if go is not None:
                count, payload = go
                for _ in range(count):
                    broadcast(server.connections, payload)
            else:
                await ws.send(message)

    async def main() -> None:
        nonlocal server
        async with serve(
            handler, "127.0.0.1", port, compression=None, max_size=MAX_SIZE, backlog=4096, ssl=tls_context()
        ) as server:
            ready(server.sockets[0].getsockname()[1])
            await asyncio.Future()

    server: Any = None
    if uvloop:
        import uvloop as uv

        uv.run(main())
    else:
        asyncio.run(main())


# --------------------------------------------------------------------- aiohttp


def run_aiohttp(port: int) -> None:
    from aiohttp import WSMsgType, web

    sockets: set[Any] = set()

    async def handler(request: Any) -> Any:
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_SIZE, autoping=True)
        await ws.prepare(request)
        sockets.add(ws)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    go = parse_go(message.data)
                    if go is not None:
                        count, payload = go
                        for _ in range(count):  # aiohttp has no broadcast: send to each in turn
                            for other in list(sockets):
                                await other.send_str(payload)
                    else:
                        await ws.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        finally:
            sockets.discard(ws)
        return ws

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096, ssl_context=tls_context())
        await site.start()
        ready(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Future()

    asyncio.run(main())


# ---------------------------------------------------------------------- picows


def run_picows(port: int) -> None:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    transports: set[Any] = set()

    class Echo(WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport: WSTransport) -> None:
            transports.add(transport)

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            transports.discard(transport)

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                text = frame.get_payload_as_ascii_text()
                go = parse_go(text)
                if go is not None:
                    count, payload = go
                    data = payload.encode()
                    for _ in range(count):
                        for other in transports:
                            other.send(WSMsgType.TEXT, data)
                    return
                transport.send(WSMsgType.TEXT, frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.BINARY:
                transport.send(WSMsgType.BINARY, frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    async def main() -> None:
        server = await ws_create_server(
            lambda _: Echo(), "127.0.0.1", port, max_frame_size=MAX_SIZE, backlog=4096, ssl=tls_context()
        )
        ready(server.sockets[0].getsockname()[1])
        await asyncio.Future()

    asyncio.run(main())


# ------------------------------------------------------------ naive anyio+wsproto


def run_naive(port: int) -> None:
    import anyio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage

    connections: set[Any] = set()

    async def serve(stream: Any) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while True:
                data = await stream.receive()
                ws.receive_data(data)
                out = b""
                for event in ws.events():
                    if isinstance(event, Request):
                        out += ws.send(AcceptConnection())
                        connections.add((ws, stream))
                    elif isinstance(event, TextMessage):
                        go = parse_go(event.data)
                        if go is not None:
                            count, payload = go
                            for _ in range(count):
                                for other_ws, other in list(connections):
                                    await other.send(other_ws.send(TextMessage(data=payload)))
                        else:
                            out += ws.send(TextMessage(data=event.data))
                    elif isinstance(event, BytesMessage):
                        out += ws.send(BytesMessage(data=event.data))
                    elif isinstance(event, Ping):
                        out += ws.send(event.response())
                    elif isinstance(event, CloseConnection):
                        await stream.send(out + ws.send(event.response()))
                        return
                if out:
                    await stream.send(out)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        finally:
            connections.discard((ws, stream))
            await stream.aclose()

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port, backlog=4096)
        ready(listener.extra(anyio.abc.SocketAttribute.local_port))  # type: ignore[attr-defined]
        await listener.serve(serve)

    import anyio.abc

    anyio.run(main)


# ------------------------------------------------------------- raw TCP echo


def run_raw_echo(port: int) -> None:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=4096)
        ready(server.sockets[0].getsockname()[1])
        await asyncio.Future()

    asyncio.run(main())


def run_raw_buffered_echo(port: int) -> None:
    """The event loop's own limit: raw TCP echoed through an `asyncio.BufferedProtocol` (no WebSocket).

    It reads into one buffer it keeps (``recv_into``) and writes the bytes back: no framing, no
    handler, nothing between the read and the write but the copy out of the buffer.
    """

    class Echo(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = memoryview(bytearray(65536))

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            self.transport.write(bytes(self.buffer[:nbytes]))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=4096)
        ready(server.sockets[0].getsockname()[1])
        await asyncio.Future()

    asyncio.run(main())


def run_websockets_redis(port: int, count: int) -> None:
    """The fan-out a user writes by hand: ``count`` websockets processes sharing the port, redis-py pub/sub.

    On "go" a process publishes each message to Redis; every process (the sender's too) broadcasts
    to its own connections what it receives from its subscription.
    """
    import os
    import signal
    import socket

    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", port))
    port = reserved.getsockname()[1]
    url = os.environ["BENCH_REDIS_URL"]

    async def main() -> None:
        import redis.asyncio as aioredis
        from websockets.asyncio.server import broadcast, serve

        client = aioredis.Redis.from_url(url)
        pubsub = client.pubsub()
        await pubsub.subscribe("bench")

        async def handler(ws: Any) -> None:
            async for message in ws:
                go = parse_go(message) if isinstance(message, str) else None
                if go is None:
                    await ws.send(message)
                    continue
                number, payload = go
                for _ in range(number):
                    await client.publish("bench", payload)

        async with serve(
            handler, "127.0.0.1", port, reuse_port=True, compression=None, max_size=MAX_SIZE, backlog=4096
        ) as server:
            ready(port)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    broadcast(server.connections, message["data"].decode())

    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            reserved.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                asyncio.run(main())
                code = 0
            except BaseException as error:
                print(f"websockets-redis process failed: {error!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        children.append(pid)

    def stop(number: int, frame: Any) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue


SERVERS = {
    "pywsserver": lambda port: run_pywsserver(port, "asyncio", False),
    "pywsserver-uvloop": lambda port: run_pywsserver(port, "asyncio", True),
    "pywsserver-trio": lambda port: run_pywsserver(port, "trio", False),
    "pywsserver-without-tree": run_pywsserver_without_tree,
    "pywsserver-nowatchdog": lambda port: run_pywsserver(port, "asyncio", False, watchdog=False),
    "pywsserver-nokeepalive": lambda port: run_pywsserver(port, "asyncio", False, keepalive=False),
    "pywsserver-1-process": lambda port: run_pywsserver_processes(port, 1),
    "pywsserver-2-processes": lambda port: run_pywsserver_processes(port, 2),
    "pywsserver-cluster-1-node": lambda port: run_pywsserver_cluster(port, 1),
    "pywsserver-cluster-2-nodes": lambda port: run_pywsserver_cluster(port, 2),
    "websockets-redis-2-processes": lambda port: run_websockets_redis(port, 2),
    "websockets": lambda port: run_websockets(port, False),
    "websockets-uvloop": lambda port: run_websockets(port, True),
    "aiohttp": run_aiohttp,
    "picows": run_picows,
    "naive-anyio-wsproto": run_naive,
    "raw-tcp-echo": run_raw_echo,
    "raw-buffered-echo": run_raw_buffered_echo,
}

if __name__ == "__main__":
    name = sys.argv[1]
    SERVERS[name](int(sys.argv[2]) if len(sys.argv) > 2 else 0)
