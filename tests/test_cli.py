"""The command line as an operator uses it: a config file, flags, clear one-line errors, start and stop lines.

Servers run as real processes (``python -m pywsserver`` or the ``pywsserver``
script) on both backends where the path differs, and real clients talk to them.
"""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from pywsserver import OptionError
from pywsserver._cli import _parser, build_options
from pywsserver._handler import HandlerModule
from pywsserver._options import parse_options
from pywsserver.protocols._mask import SPEEDUPS

from .cli_tools import SCRIPT, cli, run_cli, server_process

BACKENDS = ["asyncio", "trio"]

GREETER = """\
def init(options):
    return options.get("greeting", "hello")


def handle(message, greeting):
    if isinstance(message, str):
        return ("reply", f"{greeting} {message}", greeting)
    return ("noreply", greeting)
"""

CONFIG = """\
port = 0
drain_timeout = 2.0

[worker_options.protocol_modules.websocket]
handler_module = "greeter"
max_message_size = 16
subprotocols = ["chat.v1"]

[worker_options.protocol_modules.websocket.handler_options]
greeting = "hi"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory as a user's project: a handler module and a config file, nothing installed."""
    (tmp_path / "greeter.py").write_text(GREETER)
    (tmp_path / "config.toml").write_text(CONFIG)
    return tmp_path


def _options(*arguments: str) -> Any:
    tree, _, _ = build_options(_parser().parse_args(list(arguments)))
    return parse_options(tree)


# ------------------------------------------------------------------ --config and flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_config_file_sets_the_options_and_flags_override_them(project: Path, backend: str) -> None:
    # The pywsserver script, run in the project's directory, imports the handler from there.
    with server_process([str(SCRIPT), "--config", "config.toml", "--backend", backend], cwd=project) as served:
        port = served.port()
        with connect(f"ws://127.0.0.1:{port}/", subprotocols=["chat.v2", "chat.v1"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "chat.v1"
            ws.send("short")
            assert ws.recv(timeout=10) == "hi short"  # handler_options from the file
            ws.send("x" * 40)  # above the file's max_message_size
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        served.signal(signal.SIGTERM)
        assert served.finish()[0] == 0

    flags = ["--max-message-size", "64", "--handler-option", "greeting=hey"]
    flags += ["--subprotocol", "chat.v2", "--subprotocol", "chat.v1", "--allowed-origin", "https://good.example"]
    command = [str(SCRIPT), "--config", "config.toml", "--backend", backend, *flags]
    with server_process(command, cwd=project) as served:
        url = f"ws://127.0.0.1:{served.port()}/"
        with connect(url, subprotocols=["chat.v1", "chat.v2"], origin="https://good.example") as ws:  # type: ignore[list-item, arg-type]
            assert ws.subprotocol == "chat.v2"  # the flags' list, in the flags' order
            ws.send("x" * 40)
            assert ws.recv(timeout=10) == "hey " + "x" * 40
        with pytest.raises(InvalidStatus) as refused:
            connect(url, origin="https://evil.example", open_timeout=10).close()  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        served.signal(signal.SIGINT)
        assert served.finish()[0] == 0


def test_every_flag_lands_on_its_option() -> None:
    options = _options(
        "--host", "0.0.0.0", "--port", "9000", "--acceptors", "4", "--max-connections", "50",
        "--max-message-size", "2048", "--ping-interval", "5", "--ping-timeout", "none", "--idle-timeout", "30",
        "--drain-timeout", "3", "--allowed-origin", "https://a.example", "--allowed-origin", "https://*.b.example",
        "--subprotocol", "v2", "--subprotocol", "v1", "--no-compression", "--health-check-path", "/healthz",
        "--handler", "pywsserver.echo",
    )  # fmt: skip
    assert (options.host, options.port, options.number_of_workers, options.max_connections) == ("0.0.0.0", 9000, 4, 50)
    assert options.drain_timeout == 3.0
    websocket = options.worker.modules["websocket"].options
    assert websocket.max_message_size == 2048
    assert (websocket.ping_interval, websocket.ping_timeout, websocket.idle_timeout) == (5.0, None, 30.0)
    assert list(websocket.subprotocols) == ["v2", "v1"]
    assert websocket.compression is None
    assert options.worker.modules["http"].options.health_check_path == "/healthz"


def test_handler_option_values_are_read_as_toml_scalars_or_else_as_text() -> None:
    args = ["--handler-option", "n=3", "--handler-option", "on=true", "--handler-option", "name=ann"]
    args += ["--handler-option", 'quoted="a b"', "--handler-option", "ratio=0.5", "--handler-option", "url=http://x/"]
    options = _options(*args)
    assert dict(options.worker.modules["websocket"].options.handler_options) == {
        "n": 3,
        "on": True,
        "name": "ann",
        "quoted": "a b",
        "ratio": 0.5,
        "url": "http://x/",
    }


def test_the_old_workers_flag_still_sets_the_acceptors_with_a_notice() -> None:
    tree, by_flag, notices = build_options(_parser().parse_args(["--workers", "3"]))
    assert parse_options(tree).number_of_workers == 3
    assert by_flag == {"number_of_workers": "--workers"}
    assert notices == [
        "--workers is now --acceptors (acceptor tasks, not processes); "
        "the old name still works"
    ]


def test_the_flags_override_the_original_names_in_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "original.toml").write_text(
        "[worker_options.protocol_modules_options.wsserver_websocket_protocol]\n"
        'handler_module = "pywsserver.echo"\nmax_message_size = 10\n'
    )
    options = _options("--config", str(tmp_path / "original.toml"), "--max-message-size", "99")
    assert options.worker.modules["websocket"].options.max_message_size == 99


@pytest.mark.parametrize(
    ("config", "arguments", "line"),
    [
        (
            'port = 0\n[worker_options.protocol_modules.websocket]\nmax_message_size = "big"\n',
            [],
            "pywsserver: bad.toml: worker_options.protocol_modules.websocket.max_message_size: expected an int >= 1, "
            "got 'big'",
        ),
        (
            "port = 0\n",
            ["--max-message-size", "-5"],
            "pywsserver: --max-message-size: worker_options.protocol_modules.websocket.max_message_size: "
            "expected an int >= 1, got -5",
        ),
        ('colour = "blue"\n', [], "pywsserver: bad.toml: colour: unknown option; expected one of "),
        ("port = 0\n[worker_options\n", [], "pywsserver: bad.toml: not valid TOML: "),
        (
            '[worker_options.protocol_modules.websockets]\nhandler_module = "pywsserver.echo"\n',
            [],
            "pywsserver: bad.toml: worker_options.protocol_modules.websockets: expected a protocol module class, a "
            "short name or a dotted path, got the Python module 'websockets'; did you mean 'websocket'?",
        ),
    ],
)
def test_config_errors_name_the_file_or_the_flag_and_the_option_path(
    tmp_path: Path, config: str, arguments: list[str], line: str
) -> None:
    (tmp_path / "bad.toml").write_text(config)
    result = run_cli("--config", "bad.toml", *arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(line)
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_missing_config_file_is_one_line() -> None:
    result = run_cli("--config", "no-such.toml")
    assert (result.returncode, result.stderr) == (2, "pywsserver: --config: no such file 'no-such.toml'\n")


def test_version_says_whether_the_c_speedups_are_in_use() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("pywsserver 0.1.0")
    assert ("C speedups in use" if SPEEDUPS else "C speedups not built") in result.stdout


# ------------------------------------------------------------------ handlers


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("", "expected a handler: package.module, package.module:attr or a .py file, got ''"),
        ("missing.py", "no such file 'missing.py'; give a module name (package.module[:attr])"),
        ("mypkg.handler", "cannot import 'mypkg.handler': No module named 'requests_not_installed'"),
        ("arity", "module 'arity': the server calls handle(message, state), but handle(message) cannot take them"),
        ("broken", "cannot import 'broken': importing broken raised RuntimeError: no config"),
    ],
)
def test_a_handler_that_cannot_serve_fails_at_start_in_one_line(tmp_path: Path, handler: str, message: str) -> None:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "handler.py").write_text("import requests_not_installed\n" + GREETER)
    (tmp_path / "arity.py").write_text("def init(options):\n    return 0\n\n\ndef handle(message):\n    return None\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('no config')\n")
    result = run_cli("--handler", handler, "--port", "0", cwd=tmp_path, script=True)
    assert result.returncode == 2
    prefix = "pywsserver: --handler: worker_options.protocol_modules.websocket.handler_module: "
    assert result.stderr.startswith(prefix + message), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("reference", ["greeter_file.py", "./greeter_file.py", "greeter_file.py:init.__module__"])
def test_a_handler_may_be_given_as_a_py_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: str) -> None:
    (tmp_path / "greeter_file.py").write_text(GREETER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "greeter_file", raising=False)
    if reference.endswith("__module__"):
        with pytest.raises(OptionError, match="has no method 'init'"):
            HandlerModule(reference, "handler_module")
        return
    assert HandlerModule(reference, "handler_module").name == "greeter_file"


class _Fine:
    def init(self, options: Any, *extra: Any) -> int:
        return 0

    async def handle(self, message: Any, state: Any, context: Any = None) -> Any:
        return ("noreply", state)

    @staticmethod
    def handshake(info: Any) -> None:
        return None


class _WrongHandle:
    def init(self, options: Any) -> int:
        return 0

    def handle(self, message: Any) -> Any:
        return None


class _WrongInit:
    def init(self) -> int:
        return 0

    def handle(self, message: Any, state: Any) -> Any:
        return None


class _NeedsArguments:
    def __init__(self, database: Any) -> None:
        self.database = database

    def init(self, options: Any) -> int:
        return 0

    def handle(self, message: Any, state: Any) -> Any:
        return None


class _WrongHandshake(_Fine):
    @classmethod
    def handshake(cls) -> None:  # type: ignore[override]
        return None


@pytest.mark.parametrize("handler", [_Fine, _Fine(), _NeedsArguments(None), "pywsserver.echo"])
def test_callbacks_that_take_the_servers_arguments_pass(handler: Any) -> None:
    HandlerModule(handler, "handler_module")


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (_WrongHandle, r"the server calls handle\(message, state\), but handle\(self, message\) cannot take them"),
        (_WrongHandle(), r"the server calls handle\(message, state\), but handle\(message\) cannot take them"),
        (_WrongInit, r"the server calls init\(options\), but init\(self\) cannot take them"),
        (_NeedsArguments, r"one instance is made per connection, with no argument, but __init__\(database\)"),
        (_WrongHandshake, r"the server calls handshake\(info\), but handshake\(\) cannot take them"),
    ],
)
def test_callbacks_with_the_wrong_arguments_fail_at_start(handler: Any, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        HandlerModule(handler, "handler_module")


# ------------------------------------------------------------------ start failures


def test_a_port_in_use_is_one_line_and_exit_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    assert result.returncode == 1
    assert result.stderr.endswith(f"pywsserver: cannot listen on 127.0.0.1:{port}: Address already in use\n")
    assert "Traceback" not in result.stderr
    assert "ERROR" not in result.stderr


def test_a_host_that_does_not_resolve_is_one_line_and_exit_status_1() -> None:
    result = run_cli("--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 1
    assert result.stderr.startswith("pywsserver: cannot listen on no-such-host.invalid:0: ")
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certificates")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    issued.private_key_pem.write_to_path(folder / "key.pem")
    ca.issue_cert("other").private_key_pem.write_to_path(folder / "other-key.pem")
    return folder


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["--certfile", "nothing.pem"], "--certfile: tls.certfile: no such file 'nothing.pem'"),
        (["--certfile", "cert.pem"], "tls.keyfile: required: 'cert.pem' holds a certificate but no private key"),
        (["--certfile", "key.pem"], "--certfile: tls.certfile: 'key.pem' holds no PEM certificate"),
        (
            ["--certfile", "cert.pem", "--keyfile", "cert.pem"],
            "--keyfile: tls.keyfile: 'cert.pem' holds no PEM private key",
        ),
        (
            ["--certfile", "cert.pem", "--keyfile", "other-key.pem"],
            "--keyfile: tls.keyfile: the private key in 'other-key.pem' does not match the certificate in 'cert.pem'",
        ),
    ],
)
def test_tls_file_errors_name_the_file_and_what_is_wrong(certificates: Path, arguments: list[str], line: str) -> None:
    result = run_cli(*arguments, "--port", "0", cwd=certificates)
    assert result.returncode == 2
    assert line in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_the_trio_backend_without_trio_is_one_line() -> None:
    hide_trio = "import sys; sys.modules['trio'] = None; from pywsserver._cli import main; sys.exit(main())"
    result = subprocess_run([sys.executable, "-c", hide_trio, "--backend", "trio", "--port", "0"])
    assert (result.returncode, result.stderr) == (
        2,
        "pywsserver: --backend trio needs trio: pip install 'pywsserver[trio]'\n",
    )


def subprocess_run(command: list[str]) -> Any:
    import subprocess

    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------ the serving-on line


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_serving_on_says_wss_with_tls_and_debug_says_whether_the_speedups_are_in_use(certificates: Path) -> None:
    command = cli("--certfile", "cert.pem", "--keyfile", "key.pem", "--port", "0", "--log-level", "debug")
    with server_process(command, cwd=certificates) as served:
        port = served.port()
        served.wait_for(rf"serving on wss://127\.0\.0\.1:{port}/ \(Ctrl\+C to stop\)")
        served.wait_for("C speedups in use" if SPEEDUPS else "C speedups not built")
        served.signal()
        assert served.finish()[0] == 0


def test_serving_on_names_the_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "ws.sock"
    with server_process(cli("--unix-path", str(path))) as served:
        served.wait_for(rf"serving on ws:// on the Unix socket {path} \(Ctrl\+C to stop\)")
        served.signal()
        assert served.finish()[0] == 0


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serving_on_brackets_ipv6_addresses() -> None:
    with server_process(cli("--host", "::1", "--port", "0")) as served:
        port = int(served.wait_for(r"listening on \[::1\]:(\d+)").group(1))
        served.wait_for(rf"serving on ws://\[::1\]:{port}/")
        with connect(f"ws://[::1]:{port}/") as ws:
            ws.send("over IPv6")
            assert ws.recv(timeout=10) == "over IPv6"
        served.signal()
        assert served.finish()[0] == 0


# ------------------------------------------------------------------ stopping


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stopping_says_how_many_connections_drain_and_a_second_signal_stops_at_once(
    tmp_path: Path, backend: str
) -> None:
    # The client never answers the server's close: a graceful stop would wait for the drain timeout (60 s).
    (tmp_path / "slow.toml").write_text("[worker_options.protocol_modules.websocket]\nclose_timeout = 120.0\n")
    command = cli("--config", "slow.toml", "--port", "0", "--drain-timeout", "60", "--backend", backend)
    with server_process(command, cwd=tmp_path) as served, socket.create_connection(("127.0.0.1", served.port())) as raw:
        raw.settimeout(10)
        raw.sendall(HANDSHAKE)
        assert raw.recv(4096).startswith(b"HTTP/1.1 101 ")
        served.wait_for("serving on")
        served.signal(signal.SIGINT)
        served.wait_for(
            r"received SIGINT: stopping; 1 connection draining for up to 60s \(Ctrl\+C again to stop at once\)"
        )
        assert raw.recv(4096).startswith(b"\x88")  # the close frame (1001) came; we do not answer it
        served.signal(signal.SIGINT)
        code, log = served.finish(timeout=30)
        assert code == 128 + signal.SIGINT, log
        assert "received SIGINT again: stopping at once, dropping 1 connection" in log


SCRIPT_WITH_RUN = """\
import pywsserver

modules = [("websocket", [("handler_module", "pywsserver.echo")])]
pywsserver.run([("port", 0), ("worker_options", [("protocol_modules", modules)])], backend={backend!r})
"""

SCRIPT_WITH_TREE = """\
import sys

import pywsserver
from pywsserver import ConnectionClose
from pywsserver.supervision import Supervisor


class Tell:
    def init(self, options):
        return None

    def handle(self, message, state):
        if isinstance(message, ConnectionClose):
            print(f"the handler was told: {{message.code}} {{message.reason}}", flush=True)
            return ("noreply", state)
        return ("reply", message, state)


options = [("port", 0), ("worker_options", [("protocol_modules", [("websocket", [("handler_module", Tell)])])])]
pywsserver.run(Supervisor([pywsserver.server_child_spec(options, id="server")], name="app"), backend={backend!r})
print("run returned", flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_from_a_script_logs_as_the_command_line_does(tmp_path: Path, backend: str) -> None:
    (tmp_path / "serve.py").write_text(SCRIPT_WITH_RUN.format(backend=backend))
    with server_process([sys.executable, "serve.py"], cwd=tmp_path) as served:
        port = served.port()
        served.wait_for(rf"^\S+ \S+ INFO pywsserver.server: serving on ws://127\.0\.0\.1:{port}/")
        served.signal(signal.SIGTERM)
        served.wait_for("received SIGTERM: stopping; 0 connections draining")
        assert served.finish()[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_of_a_tree_stops_gracefully_on_sigterm(tmp_path: Path, backend: str) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(SCRIPT_WITH_TREE.format(backend=backend)))
    with server_process([sys.executable, "app.py"], cwd=tmp_path) as served:
        port = served.port()
        served.wait_for(rf"serving on ws://127\.0\.0\.1:{port}/")
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            served.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        served.wait_for("received SIGTERM: stopping; 1 connection draining")
        served.wait_for("the handler was told: 1001")
        code, log = served.finish()
        assert code == 0, log
        assert "run returned" in log


@pytest.mark.parametrize("example", ["examples/ticker.py", "examples/chat.py"])
def test_the_examples_run_their_tree_until_sigterm_and_close_with_1001(example: str) -> None:
    with server_process([sys.executable, example, "--port", "0"]) as served:
        port = served.port()
        served.wait_for("serving on")
        path = "/ws" if example.endswith("chat.py") else "/"
        with connect(f"ws://127.0.0.1:{port}{path}") as ws:
            if example.endswith("ticker.py"):
                assert str(ws.recv(timeout=10)).startswith("tick ")
            else:
                assert '"type": "joined"' in str(ws.recv(timeout=10))
            served.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        code, log = served.finish()
        assert code == 0, log
        assert "received SIGTERM: stopping; 1 connection draining" in log


@pytest.mark.parametrize("page", ["cli.md", "production.md"])
def test_the_config_files_in_the_docs_are_valid_options(page: str) -> None:
    import re
    import tomllib

    from .cli_tools import ROOT

    blocks = re.findall(r"^```toml\n(.*?)^```", (ROOT / "docs" / page).read_text(), re.MULTILINE | re.DOTALL)
    assert blocks
    for block in blocks:
        tree = tomllib.loads(block)
        tree.pop("tls", None)  # the files are the reader's
        tree["worker_options"]["protocol_modules"]["websocket"]["handler_module"] = "pywsserver.echo"
        parse_options(tree)


def test_run_leaves_logging_alone_when_the_application_configured_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from pywsserver._server import configure_logging

    mine = logging.NullHandler()
    monkeypatch.setattr(logging.root, "handlers", [mine])
    assert configure_logging() is False
    assert logging.root.handlers == [mine]
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    assert configure_logging("debug") is True
    assert logging.root.level == logging.DEBUG
    assert logging.root.handlers[0].formatter is not None
    assert logging.root.handlers[0].formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"


@pytest.mark.parametrize("handler", ["./greeter.py", "greeter.py"])
def test_the_script_serves_a_handler_given_as_a_py_file(project: Path, handler: str) -> None:
    with server_process([str(SCRIPT), "--handler", handler, "--port", "0"], cwd=project) as served:
        with connect(f"ws://127.0.0.1:{served.port()}/") as ws:
            ws.send("file")
            assert ws.recv(timeout=10) == "hello file"
        served.signal(signal.SIGINT)
        assert served.finish()[0] == 0
