"""The server tree: a supervisor over the worker supervisor, the listener and the acceptor pool.

::

    ServerSupervisor            rest_for_one
    ├── WorkerSupervisor        simple_one_for_one; one temporary worker per connection
    ├── Listener                owns the listening socket(s)
    └── AcceptorSupervisor      one_for_one
        └── Acceptor x N        accept, hand the connection to a new worker, loop

The worker supervisor comes first so that a crashed listener is restarted
together with the acceptors (rest_for_one) while the established connections
keep working. Stopping the tree stops the acceptors, then closes the
listening socket, then asks every worker at once to close with 1001 and
waits up to ``drain_timeout`` for their closing handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.metadata
import logging
import os
import platform
import signal
import socket
import stat
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
from anyio.abc import SocketListener

from ._asyncio_driver import deadline_queue
from ._errors import OptionError, ServerStartError
from ._logs import JSONFormatter
from ._options import ServerOptions, parse_options
from ._socket_transport import sockname
from ._telemetry import Telemetry
from ._watchdog import LoopWatchdog
from ._worker import Worker, _on_trio
from .protocols import BUILTIN_MODULES, HTTPOptions
from .supervision import (
    INFINITY,
    ChildSpec,
    ChildStartError,
    ChildType,
    NotRunning,
    Restart,
    Strategy,
    Supervisor,
    add_observer,
    register,
    remove_observer,
    unregister,
)
from .supervision._errors import unwrap_group

if TYPE_CHECKING:
    from ._metrics import Metrics
    from .cluster._node import ClusterNode

__all__ = ["Server", "run", "serve", "server_child_spec", "start_link", "stop"]

logger = logging.getLogger("pywsserver.server")

#: Accept errors that mean "out of a resource for now": slow down, do not crash.
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


class ListenerFailed(Exception):
    """An acceptor found the listening socket unusable; the listener child restarts."""


class Server:
    """The handle on a running server: its address, its tree, and ``stop``."""

    def __init__(self, options: ServerOptions) -> None:
        metrics_on = options.metrics
        #: The observer of every connection (the access log, the totals the metrics read), or ``None``.
        self._telemetry = (
            Telemetry(access_log=options.access_log, metrics=metrics_on) if options.access_log or metrics_on else None
        )
        #: The event-loop watchdog (``None`` when ``loop_watchdog`` is ``None``); its ``lag`` is the loop's.
        self.watchdog = LoopWatchdog(options.loop_watchdog) if options.loop_watchdog is not None else None
        #: The server's Prometheus metrics (``None`` unless ``metrics_port`` or a ``metrics_path`` is given).
        self.metrics: Metrics | None = None
        if metrics_on:
            from ._metrics import Metrics

            self.metrics = Metrics(self)
            options = _with_metrics(options, self.metrics.render)
        #: The parsed options.
        self.options = options
        #: The port actually listened on (useful with port 0); set once listening.
        self.port: int = options.port
        #: The ``(host, port)`` of each listening socket.
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[SocketListener] = []
        self._accept_locks: list[anyio.Lock] = []
        self._listener_broken = anyio.Event()
        self._slots = anyio.Semaphore(options.max_connections, fast_acquire=True)
        self._release_slot = self._slots.release  # one bound method for every worker
        self._token: anyio.lowlevel.EventLoopToken | None = None  # the event loop's, set when listening
        # The asyncio loop the server listens on (``None`` on trio), set when listening: handed to each
        # worker's driver, which then makes no asyncio.get_running_loop() call (a getpid system call each).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: How acceptors accept one connection (a seam for fault injection in tests).
        self._accept = accept
        #: The dynamic supervisor of the workers (``count_children().active`` is the live connections).
        self.worker_supervisor = Supervisor(
            [
                ChildSpec(
                    "worker",
                    _run_worker,
                    args=(self,),
                    restart=Restart.TEMPORARY,
                    shutdown=options.drain_timeout,
                )
            ],
            strategy=Strategy.SIMPLE_ONE_FOR_ONE,
            intensity=5,
            period=10,
            name=None,
        )
        # Workers that only ever await their driver's wake-up (built-in modules, every handler sync, plain TCP) stop
        # cooperatively on asyncio: no cancel scope per connection (see `_StartedProxy.set_stop`).
        self.worker_supervisor._cooperative_children = options.tls is None and _all_handlers_sync(options)
        acceptors = [
            ChildSpec(("acceptor", i), _acceptor, args=(self, i), shutdown=1.0)
            for i in range(options.number_of_workers)
        ]
        #: The supervisor of the acceptor pool.
        self.acceptor_supervisor = Supervisor(acceptors, intensity=5, period=10)
        children = [
            self.worker_supervisor.child_spec("worker_supervisor"),
            ChildSpec("listener", _listener, args=(self,), shutdown=1.0),
            self.acceptor_supervisor.child_spec("acceptor_supervisor"),
        ]
        #: The node of the cluster on Redis (the ``cluster`` option), or ``None``.
        self.cluster: ClusterNode | None = None
        if options.cluster is not None:
            from .cluster._node import ClusterNode

            self.cluster = ClusterNode(options.cluster)
            # Last: a restart of the cluster's subtree (rest_for_one) touches nothing else.
            children.append(self.cluster.child_spec("cluster"))
        if self.metrics is not None:
            # Last: its restart touches nothing else; the figures live in the Metrics object, not the task.
            children.append(ChildSpec("metrics", self.metrics.run, shutdown=1.0))
        #: The server's own supervisor (rest_for_one), the root of its tree.
        self.supervisor = Supervisor(
            children,
            strategy=Strategy.REST_FOR_ONE,
            intensity=3,
            period=10,
        )

    def __repr__(self) -> str:
        return f"<Server {self.addresses or self.options.port}>"

    @property
    def connections(self) -> int:
        """How many connections are being served now."""
        return self.worker_supervisor.count_children().active

    def workers(self) -> list[Worker]:
        """The workers of the live connections."""
        return [child.ref for child in self.worker_supervisor.which_children() if child.running]

    async def stop(self) -> None:
        """Stop accepting, close every connection with 1001 (going away), wait, then cancel what is left."""
        await self.supervisor.stop()


async def stop(server: Server) -> None:
    """Stop ``server`` (see `Server.stop`)."""
    await server.stop()


# ------------------------------------------------------------------ children


def _run_worker(
    server: Server,
    connection: anyio.abc.ByteStream | socket.socket,
    addresses: tuple[Any, Any] | None = None,
    *,
    task_status: anyio.abc.TaskStatus[Worker],
) -> Coroutine[Any, Any, None]:
    # A plain function returning the worker's coroutine: no frame of its own held for the
    # connection's whole life. ``addresses``: the peer's and the local address as the acceptor
    # knows them (each ``None`` where it does not), so that the worker does not ask the socket.
    options = server.options
    try:
        worker = Worker(
            options.worker,
            connection,
            server._release_slot,
            tls=options.tls,
            tls_handshake_timeout=options.tls_handshake_timeout,
            token=server._token,
            addresses=addresses,
            loop=server._loop,
        )
    except BaseException as error:  # the initial module could not be made, say: no worker owns the connection
        if isinstance(connection, socket.socket):
            connection.close()  # closed, then its slot given back
            server._release_slot()
            raise
        return _close_unowned(server, connection, error)
    worker._observer = server._telemetry
    return worker.run(task_status=task_status)


async def _close_unowned(server: Server, stream: anyio.abc.ByteStream, error: BaseException) -> None:
    """A stream no worker could take: closed, its slot given back, then the worker's start fails with ``error``."""
    try:
        await anyio.aclose_forcefully(stream)
    except Exception:  # the start fails with the first error, not with this one
        logger.debug("closing a connection no worker took failed", exc_info=True)
    finally:
        server._release_slot()
    raise error


async def _listener(server: Server, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    options = server.options
    multi: anyio.abc.Listener[Any]
    if options.unix_path is not None:
        _remove_stale_socket(options.unix_path)
        try:
            unix = await _unix_listener(options.unix_path, options.backlog)
        except OSError as error:
            raise ServerStartError(f"cannot listen on {options.unix_path}: {error.strerror or error}") from error
        multi, listeners = unix, [unix]
    else:
        host = options.host
        if host in ("0.0.0.0", "::", ""):
            host = None if host == "" else host
        try:
            tcp = await anyio.create_tcp_listener(
                local_host=host, local_port=server.port, backlog=options.backlog, reuse_port=options.reuse_port
            )
        except OSError as error:
            raise ServerStartError(
                f"cannot listen on {options.host or '*'}:{server.port}: {error.strerror or error}"
            ) from error
        multi, listeners = tcp, list(tcp.listeners)  # type: ignore[arg-type]
    try:
        server._listeners = listeners
        server._accept_locks = [anyio.Lock(fast_acquire=True) for _ in listeners]
        server._token = anyio.lowlevel.current_token()
        server._loop = _running_asyncio_loop()
        server._listener_broken = anyio.Event()
        if options.unix_path is not None:
            server.addresses = []
            where = options.unix_path
        else:
            server.addresses = [
                _address(listener.extra(anyio.abc.SocketAttribute.local_address)) for listener in listeners
            ]
            server.port = server.addresses[0][1]
            where = ", ".join(f"{_url_host(h)}:{p}" for h, p in server.addresses)
        logger.info("listening on %s%s", where, " (TLS)" if options.tls is not None else "")
        task_status.started()
        await server._listener_broken.wait()
        raise ListenerFailed("the listening socket failed")
    finally:
        for listener in listeners:
            _release_listener(listener)
        with anyio.CancelScope(shield=True):
            await multi.aclose()
        if options.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(options.unix_path)


async def _unix_listener(path: str, backlog: int) -> SocketListener:
    """Bind and listen on ``path``; an existing file (a live server's socket) makes this fail."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await SocketListener.from_socket(sock)


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket left by a server that died: never another kind of file, nor a live server's socket."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover
    except OSError:
        pass
    finally:
        probe.close()


def _with_metrics(options: ServerOptions, render: Callable[[], tuple[str, bytes]]) -> ServerOptions:
    """The options with ``render`` given to every HTTP module that serves a ``metrics_path``."""
    modules = dict(options.worker.modules)
    for name, config in modules.items():
        if isinstance(config.options, HTTPOptions) and config.options.metrics_path is not None:
            modules[name] = attrs.evolve(config, options=attrs.evolve(config.options, metrics=render))
    return attrs.evolve(options, worker=attrs.evolve(options.worker, modules=modules))


def _all_handlers_sync(options: ServerOptions) -> bool:
    """Whether every protocol module is a built-in one and no handler the options name has an
    ``async`` callback (nor runs its callbacks in threads): a worker's task then awaits nothing but
    its driver's wake-up, its drain and its end. (A module of the user's own may deliver to a handler
    of its own making, which the options do not show.)"""
    handlers: list[Any] = []
    builtin = set(BUILTIN_MODULES.values())
    for config in options.worker.modules.values():
        if config.module not in builtin:
            return False
        handlers.append(config.handler)
        for holder in (config.options, getattr(config.options, "endpoint", None)):
            router = getattr(holder, "router", None)
            if router is not None:
                handlers.extend(route.handler for route in router.routes)
                if router.catch_all is not None:
                    handlers.append(router.catch_all.handler)
    return not any(
        handler is not None and (handler.async_init or handler.async_handle or handler.async_handshake)
        for handler in handlers
    )


def _address(raw: Any) -> tuple[str, int]:
    return (str(raw[0]), int(raw[1]))


#: The C accept (``_speedups.accept_socket``), where it is built (Linux and the BSDs, with accept4).
_accept_socket: Callable[[int], tuple[int, tuple[str, int] | None] | None] | None
try:
    from ._speedups import accept_socket

    _accept_socket = accept_socket
except ImportError:  # pragma: no cover - depends on the installation and the platform
    _accept_socket = None
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Listening:
    """A listening socket's fast path on asyncio: accepts without the socket module's wrapper, and
    stays registered with the event loop's selector between accepts while acceptors wait.

    ``loop.sock_accept`` registers the listening socket for each connection it waits for and
    unregisters it after (two ``epoll_ctl`` calls, a handle and the selector's Python layers per
    connection when none is waiting). Here the reader stays registered while an acceptor waits
    or has just been woken (`readable` wakes it), and is removed only when it fires twice in a row
    with no acceptor waiting (so a server at ``max_connections`` does not spin) or when an acceptor
    stops while none waits (`release`). ``socket.accept`` converts the family and type to enums twice per
    connection and ``_no_delay`` a third time: the listening socket's are looked up once.

    Once an acceptor has taken a connection it arms the listening socket (`serve`): from then on the
    selector's callback itself takes each waiting connection, with a slot of ``max_connections``, and
    starts its worker, and the acceptor's task sleeps until the slots run out or an accept fails, which
    it handles as ever. A connection then costs no task step of the acceptor's (two, counting the
    wake-up by a readiness event polled before the previous connection was taken).

    Where the C speedups are built, a connection is accepted by ``_speedups.accept_socket``: no
    exception when none waits (``socket._accept`` raises one per readiness event, its message
    decoded from strerror), the new socket non-blocking from ``accept4`` (no third system call), and
    an IPv4 peer's address handed to the worker with the local one (the listening socket's, when it
    listens on one address), so that the worker asks the socket for neither: 533,000 to 517,500
    instructions per handshake under callgrind (``benchmarks/instructions.py --mode handshake``).
    """

    __slots__ = (
        "armed",
        "family",
        "fileno",
        "idle_events",
        "local",
        "loop",
        "proto",
        "raw",
        "registered",
        "server",
        "tcp",
        "type",
        "waiter",
    )

    def __init__(self, raw: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.raw = raw
        self.loop = loop
        self.family, self.type, self.proto = raw.family, raw.type, raw.proto
        self.tcp = raw.family != getattr(socket, "AF_UNIX", None)  # Unix sockets have no TCP_NODELAY
        self.fileno = raw.fileno()
        #: Every accepted connection's local address when the socket listens on one IPv4 address (not
        #: the wildcard): the worker then does not ask each socket for it. Else ``None``.
        self.local: tuple[str, int] | None = None
        if raw.family == socket.AF_INET:
            bound = raw.getsockname()
            if bound[0] != "0.0.0.0":
                self.local = bound
        self.waiter: asyncio.Future[None] | None = None
        self.idle_events = 0  # readiness events in a row with no acceptor waiting
        self.registered = False
        self.server: Server | None = None  # the server whose workers the callback starts, while armed
        self.armed: asyncio.Future[None] | None = None  # what the armed acceptor sleeps on

    def take(self, fd: int, *, nonblocking: bool = False) -> socket.socket:
        """The accepted ``fd`` as a non-blocking socket, with no Nagle delay (``nonblocking``: the
        descriptor is non-blocking already, and the socket object is told so without a system call)."""
        # The descriptor positionally: a class called with keywords builds a dict of them.
        if nonblocking:
            client = socket.socket(self.family, self.type | _SOCK_NONBLOCK, self.proto, fd)
        else:
            client = socket.socket(self.family, self.type, self.proto, fd)
        try:
            if not nonblocking:
                client.setblocking(False)
            if self.tcp:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            client.close()
            raise
        return client

    def accept_nowait(self) -> tuple[socket.socket, tuple[str, int] | None] | None:
        """A waiting connection as `take` makes it, with its peer's address when the C accept gives
        it (IPv4), else ``None``; or ``None`` when no connection waits."""
        if _accept_socket is not None:
            accepted = _accept_socket(self.fileno)
            return None if accepted is None else (self.take(accepted[0], nonblocking=True), accepted[1])
        try:
            fd, _ = self.raw._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return None
        return self.take(fd), None

    async def wait(self) -> None:
        """Until the listening socket is readable (one acceptor at a time: the caller holds the lock)."""
        waiter = self.waiter = self.loop.create_future()
        self.idle_events = 0
        if not self.registered:
            self.loop.add_reader(self.raw, self.readable)
            self.registered = True
        try:
            await waiter
        except BaseException:
            self.waiter = None
            self.release()
            raise

    async def serve(self, server: Server) -> None:
        """Take connections and start their workers from the selector's callback until the slots
        run out (then return) or an accept fails (then raise its error; no slot is held by it).
        One acceptor at a time: the caller holds the listening socket's lock."""
        armed = self.armed = self.loop.create_future()
        self.server = server
        self.idle_events = 0
        self.take_waiting()  # connections already waiting are taken now
        if not armed.done() and not self.registered:
            self.loop.add_reader(self.raw, self.readable)
            self.registered = True
        try:
            await armed
        finally:
            if self.armed is armed:  # cancelled (the acceptor stops): disarm
                self.armed = self.server = None
                self.release()

    def disarm(self, error: BaseException | None) -> None:
        """Stop starting workers from the callback and wake the armed acceptor (with ``error`` if any)."""
        armed = self.armed
        self.armed = self.server = None
        self.release()
        if armed is not None and not armed.done():
            if error is None:
                armed.set_result(None)
            else:
                armed.set_exception(error)

    def take_waiting(self) -> None:
        """Armed: take up to a batch of waiting connections, each with a slot, and start their workers."""
        server = self.server
        assert server is not None
        slots = server._slots
        start = server.worker_supervisor.start_child_soon
        local = self.local
        for _ in range(_ACCEPT_BATCH):  # a burst a batch per readiness event, as asyncio's servers do
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:  # max_connections reached: stop accepting until a connection ends
                self.disarm(None)
                return
            client: socket.socket | None = None
            try:
                accepted = self.accept_nowait()
                if accepted is None:  # none waits
                    slots.release()
                    return
                client, peer = accepted
                if peer is None:  # the worker asks the socket
                    start(client)
                else:  # the worker needs not ask the socket again (a system call each)
                    start(client, (peer, local if local is not None else sockname(client.getsockname)))
            except BaseException as error:  # the acceptor handles it as any accept or start error
                if client is not None:
                    client.close()  # closed before its slot is released
                slots.release()
                self.disarm(error)
                return

    def readable(self) -> None:
        """The selector's callback: armed, take the waiting connections; else wake the waiting
        acceptor; with none waiting, unregister."""
        if self.armed is not None:
            self.take_waiting()
            return
        waiter = self.waiter
        if waiter is None:
            # The first such event may be stale (polled before the acceptor woken last took the
            # connection, in the same loop turn); a second in a row means nobody is there to accept.
            self.idle_events += 1
            if self.idle_events > 1:
                self.release()
            return
        self.waiter = None
        if not waiter.done():
            waiter.set_result(None)

    def release(self) -> None:
        """Unregister from the selector, unless an acceptor is waiting."""
        if self.registered and self.waiter is None and self.armed is None:
            self.registered = False
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.raw)


#: Per listening socket: `_Listening` on asyncio, the raw socket on trio (the trio driver's path), or
#: ``None`` (anyio's streams: TLS on trio, other backends).
_raw_sockets: weakref.WeakKeyDictionary[SocketListener, _Listening | socket.socket | None] = (
    weakref.WeakKeyDictionary()
)


async def accept(listener: SocketListener, lock: anyio.Lock) -> anyio.abc.ByteStream | socket.socket:
    """Accept one connection; ``lock`` is held by whichever acceptor waits on ``listener``.

    On asyncio the raw socket is taken from the listening socket directly, for
    the worker's fast protocol path, and without waiting or locking when a
    connection is already there (the acceptor yields every few connections);
    on trio too, for the trio drivers (TLS included: ``_trio_tls``); elsewhere
    anyio's stream is used.
    """
    if listener in _raw_sockets:
        fast = _raw_sockets[listener]
    else:  # anyio builds every extra attribute on each call: look it up once per listener
        loop = _running_asyncio_loop()
        raw_socket = listener.extra(anyio.abc.SocketAttribute.raw_socket)
        if loop is not None:
            fast = _raw_sockets[listener] = _Listening(raw_socket, loop)
        else:
            fast = _raw_sockets[listener] = raw_socket if _on_trio() else None
    if fast is None:
        async with lock:
            return await listener.accept()
    if type(fast) is not _Listening:
        return await _accept_on_trio(fast, lock)  # type: ignore[arg-type]
    # Under load a connection is usually waiting: take it without waiting for readiness.
    accepted = fast.accept_nowait()
    if accepted is None:
        async with lock:  # asyncio allows one reader per socket: one acceptor waits, the others queue here
            while True:
                await fast.wait()
                accepted = fast.accept_nowait()
                if accepted is not None:
                    break  # else another acceptor took it
    return accepted[0]  # its worker asks the socket for the addresses (this path is not the busy one)


def _release_listener(listener: SocketListener) -> None:
    """An acceptor stops: unregister the listening socket from the selector unless another waits."""
    fast = _raw_sockets.get(listener)
    if type(fast) is _Listening:
        fast.release()


async def _accept_on_trio(raw: socket.socket, lock: anyio.Lock) -> socket.socket:
    """Accept a plain socket on trio, for the trio driver (``_trio_driver``): no anyio or trio stream
    objects per connection. As on asyncio, a connection already waiting is taken without a wait."""
    wait_readable = sys.modules["trio"].lowlevel.wait_readable
    try:
        client, _ = raw.accept()
    except (BlockingIOError, InterruptedError):
        async with lock:  # trio allows one task waiting per socket: one acceptor waits, the others queue here
            while True:
                await wait_readable(raw)
                try:
                    client, _ = raw.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                break
    client.setblocking(False)
    return _no_delay(client)


def _no_delay(client: socket.socket) -> socket.socket:
    """Replies go out at once (no Nagle delay); Unix sockets have no such option."""
    if client.family != getattr(socket, "AF_UNIX", None):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


#: Connections an acceptor takes in a row, when they are already waiting, before it lets other tasks run.
_ACCEPT_BATCH = 16


def _listening_sockets_of(index: int, acceptors: int, count: int) -> list[int]:
    """Which of ``count`` listening sockets acceptor ``index`` of ``acceptors`` accepts on: every
    socket has at least one acceptor (one acceptor, the default, serves them all), and with more
    acceptors than sockets they are spread over the sockets in turn."""
    if acceptors >= count:
        return [index % count]
    return list(range(index, count, acceptors))


async def _acceptor(server: Server, index: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    listeners = server._listeners
    mine = _listening_sockets_of(index, server.options.number_of_workers, len(listeners))
    task_status.started()
    if len(mine) == 1:
        await _accept_on(server, mine[0])
        return
    async with anyio.create_task_group() as tg:  # several listening sockets (e.g. IPv4 and IPv6)
        for which in mine:
            tg.start_soon(_accept_on, server, which)


async def _accept_on(server: Server, which: int) -> None:
    listener = server._listeners[which]
    try:
        await _accept_loop(server, listener, server._accept_locks[which])
    finally:
        _release_listener(listener)


async def _accept_loop(server: Server, listener: SocketListener, lock: anyio.Lock) -> None:
    backoff = 0.0
    streak = 0
    slots = server._slots
    while True:
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:  # max_connections reached: wait for a connection to end
            await slots.acquire()
        try:
            connection = await server._accept(listener, lock)
        except OSError as error:
            slots.release()
            backoff = await _accept_failed(server, error, backoff)
            continue
        except BaseException:
            slots.release()
            raise
        backoff = 0.0
        try:
            # The worker starts when this task next yields (at the next accept): the acceptor does
            # not wait for it, as Ranch's acceptors do not wait for their connection processes.
            server.worker_supervisor.start_child_soon(connection)
        except BaseException as error:
            slots.release()
            with anyio.CancelScope(shield=True):
                if isinstance(connection, socket.socket):
                    connection.close()
                else:
                    await connection.aclose()
            if isinstance(error, NotRunning):
                return
            raise
        fast = _raw_sockets.get(listener)
        if type(fast) is _Listening:
            # On asyncio the selector's callback takes the next connections itself (`_Listening.serve`):
            # 925,500 to 864,800 instructions per handshake under callgrind (no acceptor task step per connection).
            try:
                async with lock:
                    await fast.serve(server)
            except OSError as error:  # its slot is released already
                backoff = await _accept_failed(server, error, backoff)
            except NotRunning:
                return
            continue
        if fast is not None:
            # On trio this acceptor keeps the lock and takes the next connections itself
            # (`_trio_driver.serve_listener`): 941,700 to 853,200 instructions per handshake under callgrind.
            from ._trio_driver import serve_listener

            try:
                async with lock:
                    await serve_listener(fast, server, _ACCEPT_BATCH)  # type: ignore[arg-type]
            except OSError as error:  # its slot is released already
                backoff = await _accept_failed(server, error, backoff)
            except NotRunning:
                return
            continue
        streak += 1
        if streak == _ACCEPT_BATCH:
            # A burst of waiting connections is taken a batch at a time (as asyncio's own servers
            # take up to a backlog's worth per readiness event), then the workers started run.
            streak = 0
            await anyio.lowlevel.checkpoint()


async def _accept_failed(server: Server, error: OSError, backoff: float) -> float:
    """An accept failed: out of a resource for now, wait and return the next backoff; else the
    listening socket is broken (the listener restarts) and ``error`` is raised."""
    if error.errno in _TRANSIENT_ACCEPT_ERRORS:
        backoff = min(max(backoff * 2, 0.05), 1.0)
        logger.warning("accept failed (%s); retrying in %.2fs", error.strerror or error, backoff)
        await anyio.sleep(backoff)
        return backoff
    server._listener_broken.set()
    raise error


# --------------------------------------------------------------- public API


class _ReportServer:
    """Passes the `Server` up where the supervisor reports itself."""

    def __init__(self, real: anyio.abc.TaskStatus[Server], server: Server) -> None:
        self._real = real
        self._server = server

    def started(self, value: Any = None) -> None:
        self._real.started(self._server)


async def serve(options: Any, *, task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED) -> None:
    """Run a server until it is stopped; report its `Server` handle once listening.

    This is the start function of `server_child_spec`. A listener that
    cannot bind raises `ServerStartError`.
    """
    parsed = parse_options(options)
    if parsed.cluster is not None:
        _check_cluster_backend(_running_asyncio_loop() is not None)
    server = Server(parsed)
    if parsed.register is not None:
        register(parsed.register, server)
    if server.metrics is not None:
        add_observer(server.metrics.observe)
    if server.watchdog is not None:
        server.watchdog.start()
    try:
        with deadline_queue():  # asyncio: the connections' timers off the event loop's heap, one thread
            await server.supervisor.run(task_status=_ReportServer(task_status, server))
    except ChildStartError as error:
        raise _start_error(error) from error
    finally:
        if server.watchdog is not None:
            server.watchdog.stop()
        if server.metrics is not None:
            remove_observer(server.metrics.observe)
        if parsed.register is not None:
            unregister(parsed.register)


def _check_cluster_backend(asyncio_running: bool) -> None:
    if not asyncio_running:
        raise OptionError(
            "cluster",
            "the Redis client (redis.asyncio) runs on asyncio only, and this server runs on another "
            "event loop (trio): use the asyncio backend, or no cluster",
        )


def _start_error(error: ChildStartError) -> BaseException:
    reason: BaseException = error
    while isinstance(reason, ChildStartError):
        reason = reason.reason
    if isinstance(reason, ServerStartError):
        return reason
    return ServerStartError(f"the server failed to start: {reason!r}")


def server_child_spec(
    options: Any,
    id: Hashable = "pywsserver",
    *,
    restart: Restart | str = Restart.PERMANENT,
) -> ChildSpec:
    """A child spec that runs the server inside your own supervision tree; its ref is the `Server`.

    The options are checked now, so a bad option fails here, not at start. Example::

        tree = Supervisor([Room.child_spec("room"), server_child_spec(options, id="server")])
        async with tree.running():
            ...
    """
    parsed = parse_options(options)
    return ChildSpec(id, serve, args=(parsed,), restart=restart, type=ChildType.SUPERVISOR, shutdown=INFINITY)


@contextlib.asynccontextmanager
async def start_link(options: Any) -> AsyncIterator[Server]:
    """Start a server for the duration of an ``async with`` block.

    Example::

        async with start_link([("port", 0), ("worker_options", [...])]) as server:
            print(server.port)

    Options are checked first (`OptionError` naming the option's
    path). Entering returns once the server listens; leaving stops it. If the
    server's supervisor gives up while the block runs, the block is cancelled
    and `RestartIntensityExceeded` is raised.
    """
    parsed = parse_options(options)
    try:
        async with anyio.create_task_group() as tg:
            server: Server = await tg.start(serve, parsed)
            try:
                yield server
            finally:
                with anyio.CancelScope(shield=True):
                    await server.stop()
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None


# ------------------------------------------------------------ running a script


def describe_version() -> str:
    """What ``pywsserver --version`` prints: the version, Python's, and whether the C speedups are in use."""
    from .protocols._mask import SPEEDUPS

    try:
        version = importlib.metadata.version("pywsserver")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        version = "(not installed)"
    speedups = "C speedups in use" if SPEEDUPS else "C speedups not built: pure Python"
    return f"pywsserver {version} on Python {platform.python_version()} ({speedups})"


#: The log format of the command line (and of `run` when the application has not configured logging).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "info", *, several_processes: bool = False, log_format: str = "text") -> bool:
    """Log to stderr as the command line does, unless the application has configured logging already.

    ``log_format`` is ``"text"`` or ``"json"`` (one JSON object per line, `JSONFormatter`).
    Returns whether it configured logging (it does nothing when the root logger has handlers).
    """
    if logging.root.handlers:
        return False
    if isinstance(level, str):
        level = logging.getLevelNamesMapping()[level.upper()]
    process = " [%(process)d]" if several_processes else ""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT.replace(" %(name)s", f"{process} %(name)s")))
    logging.basicConfig(level=level, handlers=[handler])
    return True


def _where(server: Server) -> str:
    """The URLs a server serves on, as a client would write them."""
    scheme = "wss" if server.options.tls is not None else "ws"
    if server.options.unix_path is not None:
        return f"{scheme}:// on the Unix socket {server.options.unix_path}"
    return ", ".join(f"{scheme}://{_url_host(host)}:{port}/" for host, port in server.addresses)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _servers(tree: Supervisor) -> list[Server]:
    """The servers running in ``tree`` (at any depth)."""
    found: list[Server] = []
    for child in tree.which_children():
        if isinstance(child.ref, Server):
            found.append(child.ref)
        elif isinstance(child.ref, Supervisor):
            found.extend(_servers(child.ref))
    return found


class _QuietStartFailure(logging.Filter):
    """Drops the supervisor's report of a server that could not listen: `run` raises it as one clear line."""

    def filter(self, record: logging.LogRecord) -> bool:
        reason = record.exc_info[1] if record.exc_info else None
        while isinstance(reason, ChildStartError):
            reason = reason.reason
        return not isinstance(reason, ServerStartError)


async def _run_until_signal(target: ServerOptions | Supervisor) -> None:
    # The signals are caught before the server starts, so that one arriving
    # during the start still stops it gracefully.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        logger.debug("%s", describe_version())
        quiet = _QuietStartFailure()
        supervision_log = logging.getLogger("pywsserver.supervision")
        supervision_log.addFilter(quiet)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    if isinstance(target, Supervisor):
                        await tg.start(target.run)
                        servers, stop = _servers(target), target.stop
                    else:
                        server: Server = await tg.start(serve, target)
                        servers, stop = [server], server.stop
                finally:
                    supervision_log.removeFilter(quiet)
                if not servers and isinstance(target, Supervisor):
                    logger.info("running %s (Ctrl+C to stop)", target.label)
                for server in servers:
                    logger.info("serving on %s (Ctrl+C to stop)", _where(server))
                received = await signals.__anext__()
                connections = sum(server.connections for server in servers)
                drain = max((server.options.drain_timeout for server in servers), default=0.0)
                logger.info(
                    "received %s: stopping; %d connection%s draining for up to %gs (Ctrl+C again to stop at once)",
                    signal.Signals(received).name,
                    connections,
                    "" if connections == 1 else "s",
                    drain,
                )
                tg.start_soon(_stop_at_once_on_signal, signals, servers)
                await stop()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None


async def _stop_at_once_on_signal(signals: AsyncIterator[int], servers: list[Server]) -> None:
    """A second signal while draining ends the process now: connections are dropped, not closed."""
    async for received in signals:
        connections = sum(server.connections for server in servers)
        logger.warning(
            "received %s again: stopping at once, dropping %d connection%s",
            signal.Signals(received).name,
            connections,
            "" if connections == 1 else "s",
        )
        for server in servers:
            if server.options.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(server.options.unix_path)
        for handler in logging.root.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(128 + received)  # the shielded, bounded cleanups would take up to the drain timeout


def run(target: Any, *, backend: str = "asyncio") -> None:
    """Run a server, or your own supervision tree, until SIGINT or SIGTERM; then stop it gracefully.

    Blocking; for scripts. ``target`` is the server's options, or a
    `Supervisor` (your tree, with servers in it as `server_child_spec`)::

        pywsserver.run([("port", 8080), ("worker_options", [...])])
        pywsserver.run(Supervisor([Room.child_spec("room"), server_child_spec(options)]), backend="trio")

    The first signal stops gracefully (connections get 1001 and their
    handlers `ConnectionClose`, within ``drain_timeout``); a second stops at
    once. If the application has not configured logging, it logs to stderr
    at INFO as the command line does.

    With the ``processes`` option above 1, that many server processes share
    the port under a supervising parent (see `pywsserver._processes`).
    Raises `OptionError` for bad options, `ServerStartError`
    when it cannot start, `RestartIntensityExceeded` when its
    supervisor gives up.
    """
    if isinstance(target, Supervisor):
        configure_logging()
        anyio.run(_run_until_signal, target, backend=backend)
        return
    parsed = parse_options(target)
    configure_logging(several_processes=parsed.processes > 1)
    if parsed.cluster is not None:
        _check_cluster_backend(backend == "asyncio")
    if parsed.processes > 1:
        from ._processes import run_processes

        run_processes(parsed, lambda child: anyio.run(_run_until_signal, child, backend=backend))
        return
    anyio.run(_run_until_signal, parsed, backend=backend)
