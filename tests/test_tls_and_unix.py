"""``wss://`` with certificates made at test time (trustme) and verifying clients; Unix sockets."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
import websockets
from websockets.asyncio.client import connect, unix_connect

from pywsserver import OptionError, start_link

from .recorder import Recorder, server_options
from .wstools import in_client_thread, no_connections

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


def client_context(authority: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    authority.configure_trust(context)  # verifies the server's certificate and host name
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


async def wss_echo(address: str, context: ssl.SSLContext) -> Any:
    async with connect(address, ssl=context) as ws:
        await ws.send("over tls")
        return await ws.recv()


async def test_wss_with_an_ssl_context_and_a_verifying_client(
    authority: trustme.CA, server_context: ssl.SSLContext
) -> None:
    recorder = Recorder()
    async with start_link(server_options(recorder, tls=server_context)) as server:
        address = f"wss://localhost:{server.port}/"
        assert await in_client_thread(wss_echo, address, client_context(authority)) == "over tls"
        tls = recorder.inits[0]["tls"]
        assert recorder.inits[0]["secure"] is True
        assert tls.version in ("TLSv1.2", "TLSv1.3")
        assert tls.cipher
        assert tls.peer_certificate is None


async def test_a_client_that_does_not_trust_the_certificate_cannot_connect(server_context: ssl.SSLContext) -> None:
    async with start_link(server_options(tls=server_context)) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await in_client_thread(wss_echo, f"wss://localhost:{server.port}/", ssl.create_default_context())


async def test_certificate_files_and_client_certificates(authority: trustme.CA, tmp_path: Path) -> None:
    leaf = authority.issue_cert("localhost")
    leaf.private_key_pem.write_to_path(tmp_path / "key.pem")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    authority.cert_pem.write_to_path(tmp_path / "ca.pem")
    recorder = Recorder()
    tls = {
        "certfile": str(tmp_path / "cert.pem"),
        "keyfile": str(tmp_path / "key.pem"),
        "client_ca": str(tmp_path / "ca.pem"),
    }
    async with start_link(server_options(recorder, tls=tls)) as server:
        address = f"wss://localhost:{server.port}/"
        client_cert = authority.issue_cert("client@example.com")
        assert await in_client_thread(wss_echo, address, client_context(authority, client_cert)) == "over tls"
        certificate = recorder.inits[0]["tls"].peer_certificate
        assert ("email", "client@example.com") in certificate["subjectAltName"]
        # verify_client defaults to "required" with client_ca: no certificate, no connection.
        # (With TLS 1.3 the client learns it only when its first read finds the connection closed.)
        with pytest.raises((websockets.InvalidMessage, ssl.SSLError, ConnectionError)):
            await in_client_thread(wss_echo, address, client_context(authority))
        assert len(recorder.inits) == 1


@pytest.mark.parametrize(
    ("tls", "path"),
    [
        ({"keyfile": "k.pem"}, "tls.certfile"),
        ({"certfile": "/nonexistent/cert.pem"}, "tls.certfile"),
        ("cert.pem", "tls"),
        ({"certfile": "c", "verify_client": "sometimes"}, "tls.certfile"),
    ],
)
def test_bad_tls_options_fail_at_start_with_their_path(tls: Any, path: str) -> None:
    from pywsserver._options import parse_options

    with pytest.raises(OptionError) as raised:
        parse_options(server_options(tls=tls))
    assert raised.value.path == path


async def test_a_stalled_tls_handshake_is_timed_out_and_holds_no_acceptor(
    authority: trustme.CA, server_context: ssl.SSLContext
) -> None:
    options = server_options(tls=server_context, number_of_workers=1, tls_handshake_timeout=0.5)
    async with start_link(options) as server:
        # Two clients open TCP connections and never start TLS; with a single acceptor a normal client
        # still connects at once, and the stalled ones are dropped after the timeout.
        stalled = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(2)]
        address = f"wss://localhost:{server.port}/"
        assert await in_client_thread(wss_echo, address, client_context(authority)) == "over tls"
        with anyio.fail_after(5):
            for stream in stalled:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
                await stream.aclose()
        assert await no_connections(server)


async def test_plain_http_bytes_on_a_tls_port_close_the_connection(server_context: ssl.SSLContext) -> None:
    async with start_link(server_options(tls=server_context)) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while await stream.receive():
                    pass
        assert await no_connections(server)


# ------------------------------------------------------------------ Unix socket


async def test_serving_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "ws.sock")
    recorder = Recorder()

    async def client() -> Any:
        async with unix_connect(path, "ws://localhost/chat") as ws:
            await ws.send("over unix")
            return await ws.recv()

    async with start_link(server_options(recorder, unix_path=path)) as server:
        assert server.addresses == []
        assert await in_client_thread(client) == "over unix"
        assert recorder.inits[0]["path"] == "/chat"
        assert recorder.inits[0]["peer"] is None
    assert not await anyio.Path(path).exists()  # removed when the server stops


async def test_a_stale_unix_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "ws.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    async with start_link(server_options(unix_path=path)):
        from pywsserver import ServerStartError

        with pytest.raises(ServerStartError, match=r"ws\.sock"):
            async with start_link(server_options(unix_path=path)):
                pass
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    from pywsserver import ServerStartError

    with pytest.raises(ServerStartError):
        async with start_link(server_options(unix_path=str(regular))):
            pass
    assert regular.read_text() == "not a socket"
