"""The acceptors' path on asyncio: the listening socket stays registered between accepts, never spins.

`pywsserver._server._Listening` keeps the listening socket registered with the
event loop's selector while acceptors wait, instead of registering it for each
connection as ``loop.sock_accept`` does; it must unregister when nobody waits
(a server at ``max_connections``) and when the server stops.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from wsproto.events import AcceptConnection, Request, TextMessage

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
