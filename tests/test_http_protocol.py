"""The HTTP module, sans-I/O: request bytes in, effects out, no sockets and no event loop."""

from __future__ import annotations

import pytest

from pywsserver.protocols import (
    CloseSocket,
    ConnectionInfo,
    GoingAway,
    HTTPProtocol,
    SetTimer,
    Stop,
    Switch,
    Write,
    accept_key,
    parse_request_head,
)
from pywsserver.protocols._http import BadRequest, http_response

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
CONNECTION = ConnectionInfo(peer=("127.0.0.1", 5000), local=("127.0.0.1", 8080), connection_id=1)


def handshake(**overrides: str | None) -> bytes:
    headers = {
        "Host": "example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    request_line = overrides.pop("request_line", None) or "GET /chat?room=1 HTTP/1.1"
    for name, value in overrides.items():
        headers.pop(name.replace("_", "-"), None)
        if value is not None:
            headers[name.replace("_", "-")] = value
    lines = [request_line] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def new_module(**options: object) -> HTTPProtocol:
    return HTTPProtocol(HTTPProtocol.parse_options(list(options.items()), "protocol_modules.http"), CONNECTION)


def status_of(effects: list[object]) -> int:
    writes = [e for e in effects if isinstance(e, Write)]
    assert len(writes) == 1
    return int(writes[0].data.split(b" ", 2)[1])


def test_accept_key_matches_the_rfc_example() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_valid_handshake_answers_101_and_switches_with_the_request() -> None:
    module = new_module()
    assert module.start(b"", {}) == [SetTimer("handshake", 10.0)]
    effects = module.data_received(handshake())
    assert len(effects) == 2  # no SetTimer("handshake", None): the Switch clears the module's timers
    assert isinstance(effects[0], Write)
    response = effects[0].data.decode()
    assert response.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    switch = effects[1]
    assert isinstance(switch, Switch)
    assert switch.module == "websocket"
    request = switch.context["request"]
    assert (request.method, request.path, request.query) == ("GET", "/chat", "room=1")
    assert request.headers["HOST"] == "example.com"


def test_a_request_split_into_single_bytes_and_trailing_frames_are_handed_over() -> None:
    module = new_module()
    module.start(b"", {})
    head = handshake()
    effects: list[object] = []
    for i in range(len(head) - 1):
        effects += module.data_received(head[i : i + 1])
    assert effects == []
    effects += module.data_received(head[-1:] + b"\x81\x85frame")
    switch = [e for e in effects if isinstance(e, Switch)]
    assert len(switch) == 1
    assert switch[0].data == b"\x81\x85frame"


@pytest.mark.parametrize(
    "headers",
    [
        {"Upgrade": "WebSocket", "Connection": "keep-alive, UPGRADE"},
        {"Upgrade": "foo, websocket", "Connection": "Upgrade"},
    ],
)
def test_upgrade_and_connection_tokens_are_case_insensitive_lists(headers: dict[str, str]) -> None:
    module = new_module()
    effects = module.data_received(handshake(**headers))
    assert any(isinstance(e, Switch) for e in effects)


@pytest.mark.parametrize(
    ("overrides", "status", "header"),
    [
        ({"Sec_WebSocket_Version": "8"}, 426, b"Sec-WebSocket-Version: 13"),
        ({"Sec_WebSocket_Version": None}, 426, b"Sec-WebSocket-Version: 13"),
        ({"Upgrade": None, "Connection": None}, 426, b"Upgrade: websocket"),
        ({"Connection": "keep-alive"}, 400, None),
        ({"Sec_WebSocket_Key": None}, 400, None),
        ({"Sec_WebSocket_Key": "c2hvcnQ="}, 400, None),
        ({"Sec_WebSocket_Key": "not base64!!"}, 400, None),
        ({"Host": None}, 400, None),
        ({"request_line": "POST / HTTP/1.1"}, 405, b"Allow: GET"),
        ({"request_line": "GET / HTTP/1.0"}, 400, None),
        ({"request_line": "GET /"}, 400, None),
        ({"request_line": "GET / SPDY/3"}, 400, None),
    ],
)
def test_bad_handshakes_get_the_right_http_error_and_stop(
    overrides: dict[str, str | None], status: int, header: bytes | None
) -> None:
    module = new_module()
    effects = module.data_received(handshake(**overrides))
    assert status_of(effects) == status
    write = next(e for e in effects if isinstance(e, Write))
    assert b"Connection: close" in write.data
    if header is not None:
        assert header in write.data
    assert isinstance(effects[-2], CloseSocket)
    assert isinstance(effects[-1], Stop)
    assert module.data_received(b"more") == []


def test_a_malformed_header_line_is_400() -> None:
    module = new_module()
    assert status_of(module.data_received(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")) == 400


def test_the_precomputed_101_answer_is_what_the_general_response_builder_makes() -> None:
    effects = new_module().data_received(handshake())
    assert isinstance(effects[0], Write)
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(KEY))]
    assert effects[0].data == http_response(101, headers)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"no colon here", "malformed header line 'no colon here'"),
        (b"Bad Name: x", "malformed header line 'Bad Name: x'"),
        (b": empty name", "malformed header line ': empty name'"),
        (b"X-Thing: a\x00b", "a control character in the value of header 'X-Thing'"),
        (b"X-Thing: a\rb", "a control character in the value of header 'X-Thing'"),
        (b"X-Thing: a\nb", "a control character in the value of header 'X-Thing'"),
    ],
)
def test_a_refused_header_line_says_what_is_wrong(line: bytes, error: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + line)
    assert str(raised.value) == error


def test_header_values_keep_colons_and_tabs_and_lose_outer_blanks() -> None:
    request = parse_request_head(b"GET / HTTP/1.1\r\nHost:  a:8080\t\r\nX-Tab: a\tb")
    assert request.headers.raw == (("Host", "a:8080"), ("X-Tab", "a\tb"))


def test_random_bytes_are_400() -> None:
    assert status_of(new_module().data_received(b"\x16\x03\x01\x00\xa5\x01\r\n\r\n")) == 400


def test_a_request_head_over_the_limit_is_431_even_without_its_end() -> None:
    module = new_module(max_request_size=1024)
    assert module.data_received(b"GET / HTTP/1.1\r\n") == []
    effects = module.data_received(b"X-Filler: " + b"a" * 2000)
    assert status_of(effects) == 431


def test_the_handshake_timer_closes_without_a_word() -> None:
    module = new_module(handshake_timeout=0.5)
    assert module.start(b"", {}) == [SetTimer("handshake", 0.5)]
    assert module.timer_expired("handshake") == [CloseSocket(), Stop("opening handshake timed out")]


def test_the_server_going_away_during_the_handshake_answers_503() -> None:
    module = new_module()
    assert status_of(module.action(GoingAway())) == 503


def test_eof_during_the_handshake_stops_quietly() -> None:
    assert new_module().eof_received() == [Stop("client left during the handshake")]


def test_upgrade_to_names_the_module_to_switch_to() -> None:
    module = new_module(upgrade_to="lines")
    effects = module.data_received(handshake())
    assert next(e for e in effects if isinstance(e, Switch)).module == "lines"
