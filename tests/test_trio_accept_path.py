"""The acceptors' path on trio: once an acceptor has taken a connection it keeps the listening socket.

`pywsserver._trio_driver.serve_listener` takes every next connection in the
same acceptor task, which holds the listening socket's lock meanwhile (the
other acceptors wait on it), until the slots of ``max_connections`` run out
or an accept or a worker's start fails; the acceptor handles those as ever.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import anyio
import pytest
from wsproto.events import AcceptConnection, Request, TextMessage

from pywsserver import start_link
from pywsserver._server import _raw_sockets

from .recorder import server_options
from .wstools import RawClient, no_connections

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]


async def _echo_once(client: RawClient) -> None:
    await client.send(TextMessage("ping"))
    event = await client.next_event()
    assert isinstance(event, TextMessage) and event.data == "ping"


async def _one_connection(port: int) -> None:
    client = await RawClient.connect(port)
    await _echo_once(client)
    await client.aclose()


def _counting_accepts(server: Any, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every call of the server's accept (an acceptor task's step that takes one connection)."""
    accepts: list[object] = []
    original = server._accept

    async def counting_accept(listener: Any, lock: Any) -> Any:
        accepts.append(listener)
        return await original(listener, lock)

    monkeypatch.setattr(server, "_accept", counting_accept)
    return accepts


class _FaultyListeningSocket:
    """The listening socket with faults injected into its next ``_accept`` calls (the raw socket's
    methods are read-only); the rest is the socket's own."""

    def __init__(self, raw: socket.socket, faults: list[BaseException]) -> None:
        self.raw = raw
        self.faults = faults
        self.family, self.type, self.proto = raw.family, raw.type, raw.proto

    def _accept(self) -> Any:
        if self.faults:
            raise self.faults.pop(0)
        return self.raw._accept()  # type: ignore[attr-defined]

    def accept(self) -> Any:
        return self.raw.accept()

    def fileno(self) -> int:
        return self.raw.fileno()


async def test_after_the_first_connection_one_acceptor_takes_the_next_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    async with start_link(server_options(port=0, number_of_workers=4)) as server:
        accepts = _counting_accepts(server, monkeypatch)
        for _ in range(20):
            await _one_connection(server.port)
        # The acceptor that took the first connection took the next 19 without handing the lock on.
        assert len(accepts) <= 1
        assert await no_connections(server)


async def test_at_max_connections_the_acceptor_waits_for_a_slot_then_serves_on() -> None:
    async with start_link(server_options(port=0, max_connections=1, number_of_workers=2)) as server:
        first = await RawClient.connect(server.port)
        await _echo_once(first)
        waiting = RawClient(await anyio.connect_tcp("127.0.0.1", server.port))  # in the kernel's backlog
        await waiting.send(Request(host=f"127.0.0.1:{server.port}", target="/"))
        assert server.connections == 1
        await first.aclose()  # the slot comes back: the waiting connection is taken and served
        assert isinstance(await waiting.next_event(), AcceptConnection)
        await _echo_once(waiting)
        await waiting.aclose()
        for _ in range(3):
            await _one_connection(server.port)
        assert await no_connections(server)


async def test_an_accept_out_of_descriptors_while_serving_slows_down_and_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with start_link(server_options(port=0, number_of_workers=1)) as server:
        listener = server._listeners[0]
        raw = _raw_sockets[listener]
        assert isinstance(raw, socket.socket)
        faulty = _FaultyListeningSocket(raw, [OSError(errno.EMFILE, "Too many open files")])
        _raw_sockets[listener] = faulty  # type: ignore[assignment]
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))
        await _one_connection(server.port)  # taken by the acceptor's accept; its next `_accept` fails
        with anyio.fail_after(10):
            while faulty.faults:
                await anyio.lowlevel.checkpoint()
        await _one_connection(server.port)  # served after the acceptor's backoff
        assert server.acceptor_supervisor.restart_count == 0
        assert await no_connections(server)
        assert server._slots.value == server.options.max_connections
    assert any("Too many open files" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


async def test_a_worker_start_that_fails_while_serving_closes_the_socket_and_restarts_the_acceptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with start_link(server_options(port=0, number_of_workers=1, max_connections=5)) as server:
        accepts = _counting_accepts(server, monkeypatch)
        original = server.worker_supervisor.start_child_soon
        starts: list[object] = []

        def faulty_start(*args: Any) -> Any:
            starts.append(args)
            if len(starts) == 2:  # the first connection taken while serving
                raise RuntimeError("injected start fault")
            return original(*args)

        monkeypatch.setattr(server.worker_supervisor, "start_child_soon", faulty_start)
        await server.acceptor_supervisor.terminate_child(("acceptor", 0))
        await server.acceptor_supervisor.restart_child(("acceptor", 0))
        await _one_connection(server.port)
        refused = await anyio.connect_tcp("127.0.0.1", server.port)
        with anyio.fail_after(10), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await refused.receive()  # closed, never served
        await refused.aclose()
        await _one_connection(server.port)  # the restarted acceptor serves on
        assert len(accepts) == 2  # the first connection, then the restarted acceptor's first
        assert len(starts) == 3
        assert server.acceptor_supervisor.restart_count == 1
        assert await no_connections(server)
        assert server._slots.value == 5  # the failed start's slot came back
