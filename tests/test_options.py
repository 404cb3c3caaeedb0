"""Option parsing: the original's nested proplists and dicts, with errors naming the full path."""

from __future__ import annotations

from typing import Any

import pytest

from pywsserver import OptionError
from pywsserver._options import parse_options
from pywsserver.protocols import HTTPProtocol, WebSocketProtocol

from . import handlers


def with_handler(handler: Any, **top: Any) -> list[tuple[str, Any]]:
    return [
        *top.items(),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", handler)])])]),
    ]


def test_the_original_proplist_parses_with_defaults() -> None:
    options = parse_options(
        [
            ("port", 8080),
            ("number_of_workers", 10),
            ("worker_options", [("protocol_modules", [("websocket", [("handler_module", handlers)])])]),
        ]
    )
    assert options.port == 8080
    assert options.number_of_workers == 10
    assert options.host == "127.0.0.1"
    assert options.max_connections == 10000
    assert options.drain_timeout == 10.0
    websocket = options.worker.modules["websocket"]
    assert websocket.module is WebSocketProtocol
    assert websocket.options.max_message_size == 1024 * 1024
    assert websocket.handler is not None
    assert websocket.handler.target is handlers
    assert options.worker.modules["http"].module is HTTPProtocol
    assert options.worker.modules["http"].options.handshake_timeout == 10.0


def test_dicts_and_protocol_modules_options_are_accepted_too() -> None:
    options = parse_options(
        {
            "port": 0,
            "worker_options": {"protocol_modules_options": {"websocket": {"handler_module": handlers}}},
        }
    )
    assert options.port == 0
    assert "websocket" in options.worker.modules


@pytest.mark.parametrize(
    "module",
    [
        "websocket",
        "pywsserver.protocols:WebSocketProtocol",
        "pywsserver.protocols.WebSocketProtocol",
        WebSocketProtocol,
    ],
)
def test_a_protocol_module_by_short_name_dotted_path_or_object(module: Any) -> None:
    options = parse_options(
        [("worker_options", [("protocol_modules", [(module, [("handler_module", "pywsserver.echo")])])])]
    )
    assert options.worker.modules["websocket"].module is WebSocketProtocol


@pytest.mark.parametrize(
    ("handler", "name"),
    [
        (handlers, "tests.handlers"),
        ("tests.handlers", "tests.handlers"),
        (handlers.ClassHandler, "ClassHandler"),
        ("tests.handlers:ClassHandler", "ClassHandler"),
        (handlers.ClassHandler(), "ClassHandler"),
    ],
)
def test_a_handler_as_module_class_instance_or_string(handler: Any, name: str) -> None:
    options = parse_options(with_handler(handler))
    resolved = options.worker.modules["websocket"].handler
    assert resolved is not None
    assert resolved.name == name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            with_handler("tests.handlers:Missing"),
            r"^worker_options\.protocol_modules\.websocket\.handler_module: "
            r"class tests\.handlers\.Missing has no method 'handle'$",
        ),
        (with_handler("json"), r"websocket\.handler_module: module 'json' has no function 'init'"),
        (with_handler("no.such.module"), r"websocket\.handler_module: cannot import 'no\.such\.module'"),
        (with_handler(handlers, port=70000), r"^port: expected an int >= 0 and <= 65535, got 70000$"),
        (with_handler(handlers, port="80"), r"^port: expected an int"),
        (with_handler(handlers, number_of_workers=0), r"^number_of_workers: expected an int >= 1"),
        (with_handler(handlers, max_connections=-1), r"^max_connections: "),
        (with_handler(handlers, drain_timeout="soon"), r"^drain_timeout: expected a number"),
        (with_handler(handlers, colour="blue"), r"^colour: unknown option; expected one of"),
        ([("port", 1)], r"^worker_options: required"),
        ([("worker_options", [("protocol_modules", [])])], r"websocket\.handler_module: required"),
        ([("worker_options", "nope")], r"^worker_options: expected a list of \(key, value\) pairs or a dict"),
        ([("worker_options", [("protocol_modules", [("tcp", [])])])], r"protocol_modules\.tcp: cannot import 'tcp'"),
        (
            [("worker_options", [("protocol_modules", [("websocket", [("handler_module", handlers), ("x", 1)])])])],
            r"^worker_options\.protocol_modules\.websocket\.x: unknown option",
        ),
        (
            [("worker_options", [("protocol_modules", [("http", [("handshake_timeout", -1)])])])],
            r"^worker_options\.protocol_modules\.http\.handshake_timeout: expected a number",
        ),
        (
            [("worker_options", [("protocol_modules", [("json", [])])])],
            r"protocol_modules\.json: expected a protocol module class",
        ),
        ("port=80", r"^options: expected a list of \(key, value\) pairs or a dict"),
        ([("port", 1, 2)], r"^options: expected \(key, value\) pairs"),
    ],
)
def test_bad_options_fail_naming_the_full_path_and_what_was_expected(options: Any, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_options(options)


def test_the_originals_module_names_are_accepted() -> None:
    options = parse_options(
        [
            ("port", 8080),
            ("number_of_workers", 10),
            (
                "worker_options",
                [("protocol_modules", [("wsserver_websocket_protocol", [("handler_module", "pywsserver.echo")])])],
            ),
        ]
    )
    assert options.worker.modules["websocket"].handler is not None
