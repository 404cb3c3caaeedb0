"""The C accept (``_speedups.accept_socket``) the asyncio acceptor uses, and the addresses it hands
the worker: the same as the socket would give, for every kind of listening socket."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from typing import Any

import anyio
import anyio.abc
import pytest

from pywsserver import start_link
from pywsserver._server import _accept_socket

from .recorder import Recorder, server_options
from .wstools import RawClient

needs_c_accept = pytest.mark.skipif(_accept_socket is None, reason="the C accept is not built here")


def _listening(family: int = socket.AF_INET, address: Any = ("127.0.0.1", 0)) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    listener.setblocking(False)
    return listener


def _accepted(listener: socket.socket) -> tuple[int, Any]:
    """What the C accept gives for a connection known to wait (the kernel has completed it)."""
    assert _accept_socket is not None
    for _ in range(1000):  # bounded: a completed connection is on the queue at once on loopback
        accepted = _accept_socket(listener.fileno())
        if accepted is not None:
            return accepted
    raise AssertionError("no connection waited")


@needs_c_accept
def test_nothing_waiting_is_none_not_an_exception() -> None:
    assert _accept_socket is not None
    with _listening() as listener:
        assert _accept_socket(listener.fileno()) is None


@needs_c_accept
def test_an_ipv4_peer_is_the_address_getpeername_gives_and_the_socket_is_non_blocking() -> None:
    with _listening() as listener, socket.create_connection(listener.getsockname()) as client:
        fd, peer = _accepted(listener)
        accepted = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fileno=fd)
        with accepted:
            assert peer == accepted.getpeername() == client.getsockname()
            assert type(peer[0]) is str and type(peer[1]) is int
            assert os.get_blocking(fd) is False
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert accepted.gettimeout() == 0.0  # the socket object knows it is non-blocking
            client.sendall(b"ping")
            for _ in range(1000):
                try:
                    assert accepted.recv(4) == b"ping"
                    break
                except BlockingIOError:
                    continue
            else:
                raise AssertionError("nothing received")


@needs_c_accept
@pytest.mark.parametrize("host", ["127.0.0.1", "127.10.200.3", "127.255.0.99"])
def test_every_octet_of_an_ipv4_peer_is_formatted(host: str) -> None:
    with _listening(address=("127.0.0.1", 0)) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.bind((host, 0))
            client.connect(listener.getsockname())
            fd, peer = _accepted(listener)
            os.close(fd)
            assert peer == (host, client.getsockname()[1])


@needs_c_accept
def test_an_ipv6_peer_is_left_to_the_socket() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = _listening(socket.AF_INET6, ("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener, socket.create_connection(listener.getsockname()[:2]):
        fd, peer = _accepted(listener)
        os.close(fd)
        assert peer is None


@needs_c_accept
def test_a_unix_socket_peer_is_left_to_the_socket() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "s")
        with _listening(socket.AF_UNIX, path) as listener:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with client:
                client.connect(path)
                fd, peer = _accepted(listener)
                os.close(fd)
                assert peer is None


@needs_c_accept
def test_an_accept_error_is_the_oserror_python_raises() -> None:
    assert _accept_socket is not None
    with socket.socket() as unbound:  # not listening
        with pytest.raises(OSError, match="Invalid argument") as raised:
            _accept_socket(unbound.fileno())
        assert raised.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="Bad file descriptor") as raised:
        _accept_socket(-1)
    assert raised.value.errno == errno.EBADF


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_init_gets_the_peer_and_local_address_whatever_the_listening_address(host: str) -> None:
    """On one address the local address is the listening socket's, on the wildcard the socket's own."""
    recorder = Recorder()
    async with start_link(server_options(recorder, host=host)) as server:
        for count in range(1, 4):  # the acceptor's first connection, then the armed callback's
            client = await RawClient.connect(server.port)
            await recorder.wait_for(lambda count=count: len(recorder.inits) == count)  # type: ignore[misc]
            options = recorder.inits[-1]
            sock = client.stream.extra(anyio.abc.SocketAttribute.raw_socket)
            assert options["peer"] == sock.getsockname()
            assert options["local"] == sock.getpeername() == ("127.0.0.1", server.port)
            await client.aclose()


@pytest.mark.anyio
async def test_init_gets_an_ipv6_peer_from_the_socket() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).close()
        probe = _listening(socket.AF_INET6, ("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    recorder = Recorder()
    async with start_link(server_options(recorder, host="::1")) as server:
        client = await RawClient.connect(server.port, host="::1")
        await recorder.wait_for(lambda: len(recorder.inits) == 1)
        sock = client.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        assert recorder.inits[0]["peer"] == sock.getsockname()[:2]
        assert recorder.inits[0]["local"] == ("::1", server.port)
        await client.aclose()
