"""What the opening handshake decides, over real sockets: resources, the handshake hook, subprotocols,
origins, compression, the health check and the connection info ``init`` receives."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
import websockets
from websockets.asyncio.client import connect

from pywsserver import Accept, ConnectionClose, Reject, start_link

from .recorder import Recorder, ScriptedHandler, server_options
from .wstools import in_client_thread, no_connections, raw_http, response_head, url

pytestmark = pytest.mark.anyio

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def upgrade(path: str = "/", **headers: str) -> bytes:
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return UPGRADE.format(path=path, extra=extra).encode()


class Tagged(ScriptedHandler):
    """Replies with its tag and the path parameters, to tell routes apart."""

    async def handle(self, message: Any, state: dict[str, Any]) -> Any:
        if message == "who":
            options = state["recorder"].inits[state["index"]]
            return ("reply", f"{options['tag']} {sorted(options['params'].items())}", state)
        return await super().handle(message, state)


async def echo_once(address: str, text: str = "hello", **kwargs: Any) -> Any:
    async with connect(address, **kwargs) as ws:
        await ws.send(text)
        return await ws.recv()


# ------------------------------------------------------------------ resources


def routed(recorder: Recorder) -> list[tuple[str, Any]]:
    return server_options(
        recorder,
        websocket=[
            (
                "resources",
                [
                    ("/chat", [("handler_module", Tagged), ("handler_options", {"tag": "chat"})]),
                    ("/rooms/{room}/users/{user}", [("handler_module", Tagged), ("handler_options", {"tag": "user"})]),
                    ("/files/{rest*}", [("handler_options", {"tag": "files"})]),
                ],
            ),
        ],
    )


async def test_each_resource_gets_its_handler_options_and_path_parameters() -> None:
    recorder = Recorder()
    async with start_link(routed(recorder)) as server:
        assert await in_client_thread(echo_once, url(server, "/chat"), "who") == "chat []"
        assert await in_client_thread(echo_once, url(server, "/rooms/7/users/ann"), "who") == (
            "user [('room', '7'), ('user', 'ann')]"
        )
        # A resource without its own handler_module uses the module-level one (ScriptedHandler: echo).
        assert await in_client_thread(echo_once, url(server, "/files/a/b.txt"), "x") == "x"
        assert recorder.inits[-1]["params"] == {"rest": "a/b.txt"}
        assert recorder.inits[-1]["tag"] == "files"


@pytest.mark.parametrize(
    "path", ["/", "/chat/", "/chatroom", "/rooms/7/users", "/rooms//users/ann", "/rooms/7/users/a/b"]
)
async def test_a_path_that_is_not_a_resource_gets_404_and_the_server_serves_on(path: str) -> None:
    recorder = Recorder()
    async with start_link(routed(recorder)) as server:
        answer = await response_head(server.port, upgrade(path))
        assert answer.startswith(b"HTTP/1.1 404 ")
        assert recorder.inits == []
        assert await in_client_thread(echo_once, url(server, "/chat"), "still") == "still"


async def test_a_single_handler_module_serves_every_path() -> None:
    async with start_link(server_options()) as server:
        for path in ("/", "/anything", "/a/b?c=d"):
            assert await in_client_thread(echo_once, url(server, path)) == "hello"


# -------------------------------------------------------------- handshake hook


class Gatekeeper(ScriptedHandler):
    """Accepts ``?token=good`` choosing a subprotocol and adding a header; rejects the rest."""

    def handshake(self, info: dict[str, Any]) -> Any:
        info["recorder"].messages.append((-1, ("handshake", info["path"], info["query"], info["subprotocols"])))
        if info["query"] == "token=good":
            return Accept(subprotocol="v2" if "v2" in info["subprotocols"] else None, headers=[("X-Welcome", "yes")])
        if info["query"] == "token=tuple":
            return ("reject", 401, "who are you?")
        if info["query"] == "boom":
            raise RuntimeError("the hook failed on purpose")
        if info["query"] == "nonsense":
            return 42
        return Reject(403, "go away", [("X-Reason", "bad token")])


class AsyncGatekeeper(Gatekeeper):
    async def handshake(self, info: dict[str, Any]) -> Any:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        return super().handshake(info)


@pytest.mark.parametrize("handler", [Gatekeeper, AsyncGatekeeper])
async def test_the_handshake_hook_accepts_with_a_subprotocol_and_headers(handler: type) -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("subprotocols", ["v1", "v2"])])
    options[-1][1][0][1][0][1][0] = ("handler_module", handler)

    async def client(address: str) -> tuple[Any, Any, Any]:
        async with connect(address, subprotocols=["v2", "v1"]) as ws:  # type: ignore[list-item]
            await ws.send("ping-pong")
            return ws.subprotocol, ws.response.headers.get("X-Welcome"), await ws.recv()

    async with start_link(options) as server:
        assert await in_client_thread(client, url(server, "/?token=good")) == ("v2", "yes", "ping-pong")
        assert recorder.messages[0] == (-1, ("handshake", "/", "token=good", ["v2", "v1"]))
        assert recorder.inits[0]["subprotocol"] == "v2"
        assert recorder.inits[0]["worker"] is recorder.workers[0]


@pytest.mark.parametrize("handler", [Gatekeeper, AsyncGatekeeper])
@pytest.mark.parametrize(
    ("query", "status", "body", "header"),
    [
        ("token=bad", 403, b"go away", ("X-Reason", "bad token")),
        ("token=tuple", 401, b"who are you?", None),
        ("boom", 500, b"internal error\n", None),
        ("nonsense", 500, b"internal error\n", None),
    ],
)
async def test_the_handshake_hook_rejects_with_an_http_response(
    handler: type, query: str, status: int, body: bytes, header: tuple[str, str] | None, caplog: Any
) -> None:
    recorder = Recorder()
    options = server_options(recorder)
    options[-1][1][0][1][0][1][0] = ("handler_module", handler)

    async def client(address: str) -> Any:
        try:
            async with connect(address):
                return None
        except websockets.InvalidStatus as error:
            return error.response

    async with start_link(options) as server:
        response = await in_client_thread(client, url(server, f"/?{query}"))
        assert response.status_code == status
        assert response.body == body
        if header is not None:
            assert response.headers[header[0]] == header[1]
        assert recorder.inits == []  # init never ran
        assert await no_connections(server)
        if query in ("boom", "nonsense"):
            assert "handshake" in caplog.text
        # The server serves on.
        assert await in_client_thread(echo_once, url(server, "/?token=good")) == "hello"


# ---------------------------------------------------------------- subprotocols


async def test_the_servers_preference_wins_and_no_common_subprotocol_means_none() -> None:
    recorder = Recorder()

    async def client(address: str, offered: list[str]) -> Any:
        async with connect(address, subprotocols=offered) as ws:  # type: ignore[arg-type]
            return ws.subprotocol

    options = server_options(recorder, websocket=[("subprotocols", ["chat.v2", "chat.v1"])])
    async with start_link(options) as server:
        assert await in_client_thread(client, url(server), ["chat.v1", "chat.v2"]) == "chat.v2"
        assert await in_client_thread(client, url(server), ["chat.v1"]) == "chat.v1"
        answer = await response_head(server.port, upgrade(Sec_WebSocket_Protocol="mqtt"))
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-protocol" not in answer.lower()
        await recorder.wait_for(lambda: len(recorder.inits) == 3)
        assert [init["subprotocol"] for init in recorder.inits] == ["chat.v2", "chat.v1", None]
        assert recorder.inits[2]["subprotocols"] == ["mqtt"]


# --------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://example.com", True),
        ("https://EXAMPLE.com", True),
        ("https://chat.example.org", True),
        ("https://example.org", False),
        ("http://chat.example.org", False),
        ("https://evil.com", False),
        ("https://example.com.evil.com", False),
        (None, False),
    ],
)
async def test_origins_outside_the_allow_list_get_403(origin: str | None, allowed: bool) -> None:
    options = server_options(websocket=[("allowed_origins", ["https://example.com", "https://*.example.org"])])
    async with start_link(options) as server:
        request = upgrade(Origin=origin) if origin is not None else upgrade()
        answer = await response_head(server.port, request)
        assert answer.startswith(b"HTTP/1.1 101 " if allowed else b"HTTP/1.1 403 ")


async def test_none_in_the_allow_list_lets_clients_without_an_origin_in() -> None:
    options = server_options(websocket=[("allowed_origins", ["https://example.com", None])])
    async with start_link(options) as server:
        assert await in_client_thread(echo_once, url(server)) == "hello"
        answer = await raw_http(server.port, upgrade(Origin="https://evil.com"))
        assert answer.startswith(b"HTTP/1.1 403 ")


# ------------------------------------------------------------ plain HTTP requests


async def test_the_health_check_path_answers_200_and_other_plain_requests_426() -> None:
    options = server_options(websocket=[])
    options[-1][1][0][1].append(("http", [("health_check_path", "/healthz")]))
    async with start_link(options) as server:
        ok = await raw_http(server.port, b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert ok.endswith(b"\r\n\r\nOK\n")
        head = await raw_http(server.port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"\r\n\r\n")
        assert b"Content-Length: 3" in head
        other = await raw_http(server.port, b"GET /other HTTP/1.1\r\nHost: lb\r\n\r\n")
        assert other.startswith(b"HTTP/1.1 426 ")
        assert b"Upgrade: websocket" in other
        # The health check path still upgrades a WebSocket request.
        assert await in_client_thread(echo_once, url(server, "/healthz")) == "hello"


# ---------------------------------------------------------------- compression


async def test_compression_is_negotiated_with_the_websockets_client_and_messages_flow() -> None:
    recorder = Recorder()

    async def client(address: str) -> tuple[str | None, list[Any]]:
        async with connect(address, compression="deflate") as ws:
            replies = []
            for text in ("a" * 10_000, "short", "é" * 3000):
                await ws.send(text)
                replies.append(await ws.recv())
            await ws.send(b"\x00" * 50_000)
            replies.append(await ws.recv())
            return ws.response.headers.get("Sec-WebSocket-Extensions"), replies

    async with start_link(server_options(recorder)) as server:
        extensions, replies = await in_client_thread(client, url(server))
        assert extensions is not None
        assert extensions.startswith("permessage-deflate")
        assert replies == ["a" * 10_000, "short", "é" * 3000, b"\x00" * 50_000]
        assert recorder.inits[0]["extensions"] == [extensions]


async def test_compression_off_is_not_negotiated() -> None:
    async def client(address: str) -> str | None:
        async with connect(address, compression="deflate") as ws:
            await ws.send("x")
            await ws.recv()
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    async with start_link(server_options(websocket=[("compression", None)])) as server:
        assert await in_client_thread(client, url(server)) is None


async def test_a_compressed_message_inflating_past_the_limit_closes_with_1009() -> None:
    recorder = Recorder()
    options = server_options(recorder, websocket=[("max_message_size", 100_000)])

    async def client(address: str) -> Any:
        async with connect(address, compression="deflate", max_size=None) as ws:
            await ws.send("fine")
            assert await ws.recv() == "fine"
            await ws.send(b"\x00" * 5_000_000)  # about 5 KB on the wire, 5 MB inflated
            try:
                await ws.recv()
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    async with start_link(options) as server:
        assert await in_client_thread(client, url(server)) == 1009
        await recorder.wait_for(lambda: len(recorder.closes) == 1)
        assert recorder.closes[0][1] == ConnectionClose(1009, "message larger than 100000 bytes")
        assert await in_client_thread(echo_once, url(server)) == "hello"
