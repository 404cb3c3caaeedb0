"""The acceptors' path on asyncio: the listening socket stays registered between accepts, never spins.

`pywsserver._server._Listening` keeps the listening socket registered with the
event loop's selector while acceptors wait, instead of registering it for each
connection as ``loop.sock_accept`` does; it must unregister when nobody waits
(a server at ``max_connections``) and when the server stops.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import AcceptConnection, Request, TextMessage

from pywsserver import _server as server_module
from pywsserver import start_link
from pywsserver._server import _Listening, _raw_sockets

from .recorder import server_options
from .wstools import RawClient, no_connections

pytestmark = pytest.mark.anyio


def _listening(server: Any) -> _Listening:
    fast = _raw_sockets[server._listeners[0]]
    assert type(fast) is _Listening
    return fast


async def _echo_once(client: RawClient) -> None:
    await client.send(TextMessage("ping"))
    event = await client.next_event()
    assert isinstance(event, TextMessage) and event.data == "ping"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_connections_one_after_another_register_the_listening_socket_once(monkeypatch: Any) -> None:
    loop = asyncio.get_running_loop()
    registrations: list[int] = []
    add_reader = loop.add_reader

    def counting_add_reader(fd: Any, callback: Any, *args: Any) -> None:
        registrations.append(fd.fileno() if hasattr(fd, "fileno") else fd)
        add_reader(fd, callback, *args)

    monkeypatch.setattr(loop, "add_reader", counting_add_reader)
    async with start_link(server_options(port=0, number_of_workers=3)) as server:
        listening_fd = server._listeners[0].extra(anyio.abc.SocketAttribute.raw_socket).fileno()
        for _ in range(20):
            client = await RawClient.connect(server.port)
            await _echo_once(client)
            await client.aclose()
        assert registrations.count(listening_fd) == 1
        assert _listening(server).registered
        assert await no_connections(server)
    assert not _listening(server).registered  # the acceptors stopped: unregistered before the socket closed


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_at_max_connections_the_listening_socket_is_unregistered_until_a_slot_frees() -> None:
    async with start_link(server_options(port=0, max_connections=1, number_of_workers=2)) as server:
        first = await RawClient.connect(server.port)
        await _echo_once(first)
        waiting = RawClient(await anyio.connect_tcp("127.0.0.1", server.port))  # in the kernel's backlog
        await waiting.send(Request(host=f"127.0.0.1:{server.port}", target="/"))
        fast = _listening(server)
        with anyio.fail_after(10):
            while fast.registered:  # readable, nobody waits to accept: the reader goes, no busy loop
                await anyio.lowlevel.checkpoint()
        await first.aclose()  # the slot comes back: the waiting connection is taken and served
        assert isinstance(await waiting.next_event(), AcceptConnection)
        await _echo_once(waiting)
        await waiting.aclose()
        with anyio.fail_after(10):
            while not fast.registered:  # nothing waits in the backlog: an acceptor waits for readiness
                await anyio.lowlevel.checkpoint()
        second = await RawClient.connect(server.port)
        await _echo_once(second)
        await second.aclose()


class _FaultyListeningSocket:
    """The listening socket with faults injected into its next accepts (the raw socket's methods are read-only)."""

    def __init__(self, raw: Any, faults: list[BaseException]) -> None:
        self.raw = raw
        self.faults = faults

    def _accept(self) -> Any:
        if self.faults:
            raise self.faults.pop(0)
        return self.raw._accept()

    def fileno(self) -> int:
        return int(self.raw.fileno())


def _inject_accept_faults(monkeypatch: Any, fast: _Listening, faults: list[BaseException]) -> None:
    """Faults raised by the next accepts of ``fast``, in whichever accept it uses (the C one when built)."""
    if server_module._accept_socket is None:
        fast.raw = _FaultyListeningSocket(fast.raw, faults)  # type: ignore[assignment]
        return
    accept_socket = server_module._accept_socket

    def faulty(fd: int) -> Any:
        if faults:
            raise faults.pop(0)
        return accept_socket(fd)

    monkeypatch.setattr(server_module, "_accept_socket", faulty)


async def _armed(server: Any) -> _Listening:
    """The listening socket once its acceptor has armed it (after the first connection)."""
    first = await RawClient.connect(server.port)
    await _echo_once(first)
    await first.aclose()
    fast = _listening(server)
    with anyio.fail_after(10):
        while fast.armed is None:
            await anyio.lowlevel.checkpoint()
    return fast


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_once_armed_the_acceptor_task_is_not_woken_per_connection(monkeypatch: Any) -> None:
    async with start_link(server_options(port=0, number_of_workers=1)) as server:
        accepts: list[object] = []
        original = server._accept

        async def counting_accept(listener: Any, lock: Any) -> Any:
            accepts.append(listener)
            return await original(listener, lock)

        monkeypatch.setattr(server, "_accept", counting_accept)
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))
        await _armed(server)
        for _ in range(20):
            client = await RawClient.connect(server.port)
            await _echo_once(client)
            await client.aclose()
        assert len(accepts) == 1  # the first connection; the next 20 were taken by the selector's callback
        assert await no_connections(server)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_accept_out_of_descriptors_in_the_callback_slows_down_and_serves_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    async with start_link(server_options(port=0, number_of_workers=1)) as server:
        fast = await _armed(server)
        _inject_accept_faults(monkeypatch, fast, [OSError(errno.EMFILE, "Too many open files")])
        client = await RawClient.connect(server.port)
        await _echo_once(client)  # served after the acceptor's backoff
        await client.aclose()
        assert server.acceptor_supervisor.restart_count == 0
        assert await no_connections(server)
    assert any("Too many open files" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_worker_start_that_fails_in_the_callback_closes_the_socket_and_restarts_the_acceptor(
    monkeypatch: Any,
) -> None:
    async with start_link(server_options(port=0, number_of_workers=1, max_connections=5)) as server:
        await _armed(server)
        original = server.worker_supervisor.start_child_soon
        faults = [RuntimeError("injected start fault")]

        def faulty_start(*args: Any) -> Any:
            if faults:
                raise faults.pop()
            return original(*args)

        monkeypatch.setattr(server.worker_supervisor, "start_child_soon", faulty_start)
        refused = await anyio.connect_tcp("127.0.0.1", server.port)
        with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await refused.receive()  # closed, never served
        await refused.aclose()
        client = await RawClient.connect(server.port)  # the restarted acceptor serves on
        await _echo_once(client)
        await client.aclose()
        assert server.acceptor_supervisor.restart_count == 1
        assert await no_connections(server)
        assert server._slots.value == 5  # the failed start's slot came back


def test_every_listening_socket_has_an_acceptor_whatever_the_pool() -> None:
    from pywsserver._server import _listening_sockets_of

    for count in range(1, 5):
        for acceptors in range(1, 7):
            served = [which for index in range(acceptors) for which in _listening_sockets_of(index, acceptors, count)]
            assert sorted(set(served)) == list(range(count))  # each socket has an acceptor
            assert all(_listening_sockets_of(index, acceptors, count) for index in range(acceptors))  # none idle


async def test_one_acceptor_serves_every_listening_socket(monkeypatch: Any) -> None:
    from anyio.streams.stapled import MultiListener

    create_tcp_listener = anyio.create_tcp_listener

    async def on_loopback_v4_and_v6(**kwargs: Any) -> Any:  # as a host name with both addresses would give
        v4 = await create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = v4.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        try:
            v6 = await create_tcp_listener(local_host="::1", local_port=port)
        except OSError:
            await v4.aclose()
            pytest.skip("no IPv6 loopback here")
        return MultiListener([*v4.listeners, *v6.listeners])

    monkeypatch.setattr(anyio, "create_tcp_listener", on_loopback_v4_and_v6)
    async with start_link(server_options()) as server:
        assert len(server._listeners) == 2
        assert server.acceptor_supervisor.count_children().active == 1  # the default pool: one acceptor
        for host in ("127.0.0.1", "::1", "127.0.0.1", "::1"):
            client = RawClient(await anyio.connect_tcp(host, server.port))
            await client.send(Request(host=f"{host}:{server.port}", target="/"))
            assert isinstance(await client.next_event(), AcceptConnection)
            await _echo_once(client)
            await client.aclose()
        assert await no_connections(server)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_request_that_came_with_the_connection_is_read_by_the_workers_first_step(monkeypatch: Any) -> None:
    from pywsserver._socket_transport import SocketTransport

    reads_through_the_transport: list[object] = []
    read_ready = SocketTransport._read_ready

    def counting_read_ready(self: SocketTransport) -> None:
        reads_through_the_transport.append(self._protocol)
        read_ready(self)

    monkeypatch.setattr(SocketTransport, "_read_ready", counting_read_ready)
    async with start_link(server_options(port=0, max_connections=1)) as server:
        first = await RawClient.connect(server.port)
        waiting = RawClient(await anyio.connect_tcp("127.0.0.1", server.port))  # in the kernel's backlog
        await waiting.send(Request(host=f"127.0.0.1:{server.port}", target="/"))  # there before it is accepted
        await _echo_once(first)
        await first.aclose()
        assert isinstance(await waiting.next_event(), AcceptConnection)
        where = waiting.stream.extra(anyio.abc.SocketAttribute.local_address)
        (worker,) = [worker for worker in server.workers() if worker.peer == where]
        assert worker._driver not in reads_through_the_transport  # type: ignore[attr-defined]  # the worker's own read
        await _echo_once(waiting)  # then the transport reads as ever
        assert worker._driver in reads_through_the_transport  # type: ignore[attr-defined]
        await waiting.aclose()
        assert await no_connections(server)
