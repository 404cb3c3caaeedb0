"""TLS connections end to end over loopback: large messages, bad and stalled handshakes, close_notify, resets.

On asyncio these run through the TLS pump (``pywsserver._tls_pump``); on trio through anyio's
``TLSStream`` (the stream driver): the same behaviour is asked of both.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct

import anyio
import pytest
import trustme
from websockets.asyncio.client import connect

from pywsserver import start_link
from pywsserver._worker import bad_input

from .recorder import Recorder, server_options
from .wstools import in_client_thread, no_connections

pytestmark = pytest.mark.anyio

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authority.configure_trust(context)
    return context


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame, mask zero (the payload goes as is)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + b"\x00\x00\x00\x00" + payload


def upgraded_tls_socket(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A blocking TLS socket (5 s timeout on every call), upgraded to WebSocket."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = tls.recv(4096)
        assert chunk, f"closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return tls


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (bounded by the socket's timeout and ``limit``)."""
    received = b""
    while len(received) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        received += chunk
    return received


async def test_large_messages_both_ways_split_across_records(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Messages far larger than a TLS record (16 KiB) and than a read, echoed, several in a row."""
    recorder = Recorder()
    sizes = [1, 16383, 16385, 70000, 1 << 20]

    async def client(address: str) -> list[bytes]:
        echoed = []
        async with connect(address, ssl=client_context, max_size=2 << 20) as ws:
            for size in sizes:
                await ws.send(os.urandom(size))
            for size in sizes:
                echoed.append(await ws.recv())
                assert len(echoed[-1]) == size
        return echoed

    options = server_options(recorder, websocket=[("max_message_size", 2 << 20)], tls=server_context)
    async with start_link(options) as server:
        echoed = await in_client_thread(client, f"wss://localhost:{server.port}/")
        assert echoed == [message for _, message in recorder.messages]
        assert await no_connections(server)


async def test_garbage_instead_of_a_client_hello_closes_the_connection(server_context: ssl.SSLContext) -> None:
    async with start_link(server_options(tls=server_context)) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(b"\x16\x03\x01\x00\x05garbage that is no ClientHello" * 4)
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while await stream.receive():  # perhaps an alert first
                    pass
        assert await no_connections(server)


async def test_a_client_stalled_mid_handshake_is_closed_by_the_timeout(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    # The first bytes of a real ClientHello, then nothing.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    options = server_options(tls=server_context, tls_handshake_timeout=0.5)
    async with start_link(options) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(hello[: len(hello) // 2])
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
        assert await no_connections(server)


async def test_close_notify_from_the_client_ends_the_connection(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, anyio_backend: str
) -> None:
    recorder = Recorder()

    def client(port: int) -> tuple[bytes, bytes | None]:
        tls = upgraded_tls_socket(port, client_context)
        tls.sendall(masked_frame(1, b"before close_notify"))
        expected = b"\x81\x13before close_notify"
        echoed = b""
        while len(echoed) < len(expected):
            echoed += tls.recv(4096)
        try:
            raw = tls.unwrap()  # close_notify, and the server's in return
        except ssl.SSLEOFError:  # the server closed without its close_notify
            tls.close()
            return echoed, None
        rest = read_until_closed(raw)
        raw.close()
        return echoed, rest

    async with start_link(server_options(recorder, tls=server_context)) as server:
        echoed, rest = await anyio.to_thread.run_sync(client, server.port)
        assert echoed == b"\x81\x13before close_notify"
        assert rest == b""  # the server's close_notify in return, and nothing after it (both backends)
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 1006  # no closing handshake: the stream ended
        assert await no_connections(server)


async def test_an_abrupt_reset_frees_the_connection(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    recorder = Recorder()

    def client(port: int) -> None:
        tls = upgraded_tls_socket(port, client_context)
        tls.sendall(masked_frame(2, b"x" * 100000)[:50000])  # a message half sent
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()  # a reset, no close_notify

    async with start_link(server_options(recorder, tls=server_context)) as server:
        await anyio.to_thread.run_sync(client, server.port)
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 1006
        assert await no_connections(server)
        # And the server serves the next client.
        tls = await anyio.to_thread.run_sync(upgraded_tls_socket, server.port, client_context)
        tls.close()


async def test_a_server_close_sends_close_notify_after_the_close_frame(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    def client(port: int) -> bytes:
        tls = upgraded_tls_socket(port, client_context)
        tls.sendall(masked_frame(1, b"close"))  # the scripted handler closes
        received = b""
        while not received.startswith(b"\x88\x02"):
            received += tls.recv(4096)
        tls.sendall(masked_frame(8, received[2:4]))  # the closing handshake's answer
        while True:  # a clean close_notify reads as b""; an unclean end would raise SSLEOFError
            chunk = tls.recv(4096)
            if not chunk:
                break
            received += chunk
        tls.close()
        return received

    async with start_link(server_options(Recorder(), tls=server_context)) as server:
        received = await anyio.to_thread.run_sync(client, server.port)
        assert received.startswith(b"\x88")  # the close frame, then close_notify
        assert await no_connections(server)


async def test_alpn_and_a_contexts_sni_callback_work_through_the_connection(authority: trustme.CA) -> None:
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    context.sni_callback = lambda ssl_object, name, ctx: names.append(name)  # type: ignore[assignment,misc,return-value]

    def client(port: int) -> str | None:
        client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        authority.configure_trust(client_context)
        client_context.set_alpn_protocols(["h2", "http/1.1"])
        tls = upgraded_tls_socket(port, client_context)
        protocol = tls.selected_alpn_protocol()
        tls.close()
        return protocol

    async with start_link(server_options(Recorder(), tls=context)) as server:
        assert await anyio.to_thread.run_sync(client, server.port) == "http/1.1"
        assert names == ["localhost"]
        assert await no_connections(server)


async def test_a_bad_record_after_the_handshake_is_reported_and_drops_only_that_connection(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A record OpenSSL cannot authenticate, once the connection is secured: the error reported on
    ``pywsserver.bad_input`` (escaped), the connection dropped (1006 to the handler), the server
    serving the next client, on both backends."""
    caplog.set_level("DEBUG", logger="pywsserver")
    bad_input.reset()  # another test may have reported within the interval
    recorder = Recorder()

    def client(port: int) -> None:
        tls = upgraded_tls_socket(port, client_context)
        os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data, not authentic
        with pytest.raises((ssl.SSLError, OSError)):  # the server's alert (bad record MAC), or the reset
            read_until_closed(tls)
            raise ConnectionResetError("closed without an alert")  # as good: what matters is the server's side
        tls.close()

    async with start_link(server_options(recorder, tls=server_context)) as server:
        await anyio.to_thread.run_sync(client, server.port)
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1].code == 1006
        assert await no_connections(server)
        assert any("TLS errors" in record.getMessage() for record in caplog.records), caplog.text
        tls = await anyio.to_thread.run_sync(upgraded_tls_socket, server.port, client_context)
        tls.close()


def coalesced_client(port: int, context: ssl.SSLContext, then_half_close: bool) -> tuple[bytes, bytes]:
    """A client over memory BIOs: its handshake's last flight, the upgrade request and a message in
    one send (as TLS 1.3 clients often do), then, if asked, the end of its side of the stream. What
    it reads back, until the echo is there or the server closes: the 101's status line, and the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        for _ in range(20):  # bounded: a handshake takes two round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(UPGRADE + masked_frame(1, b"hello coalesced"))
        sock.sendall(outgoing.read())  # the Finished, the request and the message in one segment
        if then_half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        expected = len(b"\x81\x0fhello coalesced")
        for _ in range(1000):  # bounded: each pass reads or ends
            head, _, rest = received.partition(b"\r\n\r\n")
            if len(rest) >= expected:
                break
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], rest
    finally:
        sock.close()


@pytest.mark.parametrize("then_half_close", [False, True])
async def test_a_request_that_came_with_the_handshakes_end_is_served(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, then_half_close: bool
) -> None:
    """The client's request and first message arrive with its Finished; the server answers both, and
    a stream ended right after them (trio: the driver reads the socket at once after the handshake)
    is taken as the end only after them."""
    async with start_link(server_options(Recorder(), tls=server_context)) as server:
        status, rest = await anyio.to_thread.run_sync(coalesced_client, server.port, client_context, then_half_close)
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert rest.startswith(b"\x81\x0fhello coalesced")


async def test_a_failed_handshake_tells_the_client_why(authority: trustme.CA) -> None:
    """A client that offers only TLS 1.3 to a server capped at TLS 1.2 gets OpenSSL's alert (protocol
    version), not a bare end of the stream, on both backends; the server serves on."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authority.configure_trust(client_context)
    client_context.minimum_version = ssl.TLSVersion.TLSv1_3

    def client(port: int) -> str:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            client_context.wrap_socket(raw, server_hostname="localhost").close()
        except ssl.SSLError as error:
            return str(error)
        finally:
            raw.close()
        return "connected"

    async with start_link(server_options(Recorder(), tls=context)) as server:
        assert "PROTOCOL_VERSION" in await anyio.to_thread.run_sync(client, server.port)
        assert await no_connections(server)
