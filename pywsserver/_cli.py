"""The command line: ``python -m pywsserver`` / ``pywsserver`` runs a server until Ctrl+C.

Every flag that sets an option is one row of `FLAGS`: the flag, where its
value goes in the options tree, how it is parsed. A ``--config`` file (TOML)
gives the whole tree under the options' own names; the flags given on the
command line override it, value by value.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ._errors import OptionError, ServerStartError
from ._optionkit import as_pairs
from ._server import configure_logging, describe_version, run
from .supervision import RestartIntensityExceeded

__all__ = ["FLAGS", "Flag", "main"]

logger = logging.getLogger("pywsserver.cli")

#: Where the WebSocket and HTTP modules' options live in the tree.
WEBSOCKET = ("worker_options", "protocol_modules", "websocket")
HTTP = ("worker_options", "protocol_modules", "http")

#: Keys that stand for the same place in the tree (the original's names).
_ALIASES = {
    "protocol_modules": ("protocol_modules_options",),
    "websocket": ("wsserver_websocket_protocol",),
    "http": ("wsserver_http_protocol",),
}


def _seconds(text: str) -> float | None:
    """A number of seconds, or ``none``/``off`` for no limit."""
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds or 'none', got {text!r}") from None


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value``; the value read as a TOML scalar (``3``, ``true``, ``0.5``, ``"a b"``) or else as text."""
    key, equals, raw = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


class Flag(NamedTuple):
    """One command-line flag that sets an option."""

    #: The flag's names, e.g. ``("--max-message-size",)``.
    names: tuple[str, ...]
    #: Where its value goes in the options tree.
    path: tuple[str, ...]
    #: What ``--help`` says.
    help: str
    #: How the text is parsed (argparse's ``type``); ``None`` for a switch.
    parse: Callable[[str], Any] | None = str
    #: The value a switch sets.
    constant: Any = None
    #: Whether the flag may be given several times (its values make a list).
    repeat: bool = False
    #: How ``--help`` names the value.
    metavar: str | None = None


#: The flags that set options, in the order ``--help`` lists them.
FLAGS: tuple[Flag, ...] = (
    Flag(
        ("--handler",),
        (*WEBSOCKET, "handler_module"),
        "the handler: package.module, package.module:attr or a "
        ".py file, imported from the current directory (default: pywsserver.echo)",
        metavar="HANDLER",
    ),
    Flag(
        ("--handler-option",),
        (*WEBSOCKET, "handler_options"),
        "an entry for the options init() receives; "
        'the value is read as TOML (3, true, 0.5, "text") or else as text; repeatable',
        parse=_key_value,
        repeat=True,
        metavar="KEY=VALUE",
    ),
    Flag(("--host",), ("host",), "interface to listen on (default: 127.0.0.1)"),
    Flag(("--port",), ("port",), "TCP port (default: 8080; 0 picks a free port)", parse=int),
    Flag(
        ("--acceptors",),
        ("number_of_workers",),
        "acceptor tasks, not processes (number_of_workers; default: 1, enough on one event loop)",
        parse=int,
        metavar="N",
    ),
    Flag(("--max-connections",), ("max_connections",), "connections served at once (default: 10000)", parse=int),
    Flag(
        ("--processes",),
        ("processes",),
        "server processes sharing the port, under a supervising parent (default: 1)",
        parse=int,
        metavar="N",
    ),
    Flag(("--unix-path",), ("unix_path",), "listen on this Unix socket instead of TCP", metavar="PATH"),
    Flag(("--certfile",), ("tls", "certfile"), "serve wss:// with this certificate chain (PEM)", metavar="FILE"),
    Flag(("--keyfile",), ("tls", "keyfile"), "the private key of the certificate (PEM), if not in it", metavar="FILE"),
    Flag(
        ("--max-message-size",),
        (*WEBSOCKET, "max_message_size"),
        "the largest message in bytes, after decompression (default: 1048576)",
        parse=int,
        metavar="BYTES",
    ),
    Flag(
        ("--ping-interval",),
        (*WEBSOCKET, "ping_interval"),
        "seconds between keepalive pings, or none (default: 20)",
        parse=_seconds,
        metavar="SECONDS",
    ),
    Flag(
        ("--ping-timeout",),
        (*WEBSOCKET, "ping_timeout"),
        "seconds a keepalive ping waits for its pong, or none (default: 20)",
        parse=_seconds,
        metavar="SECONDS",
    ),
    Flag(
        ("--idle-timeout",),
        (*WEBSOCKET, "idle_timeout"),
        "seconds without a frame from the client before closing with 1001, or none (default: none)",
        parse=_seconds,
        metavar="SECONDS",
    ),
    Flag(
        ("--drain-timeout",),
        ("drain_timeout",),
        "seconds connections get to close when the server stops (default: 10)",
        parse=float,
        metavar="SECONDS",
    ),
    Flag(
        ("--allowed-origin",),
        (*WEBSOCKET, "allowed_origins"),
        "an Origin allowed to connect (https://example.com or https://*.example.com); repeatable; default: any",
        repeat=True,
        metavar="ORIGIN",
    ),
    Flag(
        ("--subprotocol",),
        (*WEBSOCKET, "subprotocols"),
        "a subprotocol spoken, in order of preference; repeatable",
        repeat=True,
        metavar="NAME",
    ),
    Flag(
        ("--no-compression",),
        (*WEBSOCKET, "compression"),
        "do not negotiate permessage-deflate (on by default)",
        parse=None,
        constant=None,
    ),
    Flag(
        ("--health-check-path",),
        (*HTTP, "health_check_path"),
        "a path answered 200 OK to plain GET/HEAD, e.g. /healthz",
        metavar="PATH",
    ),
    Flag(
        ("--metrics-path",),
        (*HTTP, "metrics_path"),
        "serve Prometheus metrics at this path of the server's port, e.g. /metrics (needs pywsserver[metrics])",
        metavar="PATH",
    ),
    Flag(
        ("--metrics-port",),
        ("metrics_port",),
        "serve Prometheus metrics on this port of --host too (needs pywsserver[metrics])",
        parse=int,
        metavar="PORT",
    ),
    Flag(
        ("--no-access-log",),
        ("access_log",),
        "no pywsserver.access line per connection (on by default)",
        parse=None,
        constant=False,
    ),
    Flag(
        ("--cluster-url",),
        ("cluster", "url"),
        "join the cluster on this Redis server (redis://host:port/db): "
        "groups, broadcast and send reach every process and machine with the same URL (needs "
        "pywsserver[redis])",
        metavar="URL",
    ),
)

#: Old flag names that still work, with a notice: old name -> new name.
RENAMED = {"--workers": "--acceptors"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pywsserver",
        description="Run a pywsserver WebSocket server (the built-in echo handler by default) until Ctrl+C "
        "or SIGTERM. Flags override the --config file.",
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version (and whether the C speedups are in use) and exit"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a TOML file holding the options, under their own names (see docs/cli.md)"
    )
    for index, flag in enumerate(FLAGS):
        dest = f"flag_{index}"
        if flag.parse is None:
            parser.add_argument(
                *flag.names, dest=dest, action="store_const", const=flag.constant, default=_UNSET, help=flag.help
            )
            continue
        parser.add_argument(
            *flag.names,
            dest=dest,
            type=flag.parse,
            default=None if flag.repeat else _UNSET,  # (append needs a list or None)
            help=flag.help,
            action="append" if flag.repeat else "store",
            metavar=flag.metavar or flag.names[0].removeprefix("--").upper().replace("-", "_"),
        )
    for old, new in RENAMED.items():
        index = next(i for i, flag in enumerate(FLAGS) if new in flag.names)
        parse = FLAGS[index].parse
        assert parse is not None
        parser.add_argument(old, dest=f"renamed_{index}", type=parse, default=_UNSET, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, for log shippers (default: text)",
    )
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"], help="default: asyncio")
    return parser


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


_UNSET: Any = _Unset()


class CommandLineError(Exception):
    """A command line that cannot run; the message is the whole line to print."""


def _load_config(file: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise CommandLineError(f"--config: no such file {file!r}") from None
    except OSError as error:
        raise CommandLineError(f"--config: cannot read {file!r}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise CommandLineError(f"{file}: not valid TOML: {error}") from None


def _node(tree: dict[str, Any], path: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The dict at ``path`` in ``tree`` (following the original's names), made where absent; and its dotted path.

    A level given as ``(key, value)`` pairs becomes a dict, so that a flag can replace one value in it.
    """
    node: dict[str, Any] = tree
    names: list[str] = []
    for key in path:
        name = next((n for n in (key, *_ALIASES.get(key, ())) if n in node), key)
        value = node.get(name)
        where = ".".join([*names, name])
        if value is None or value == []:
            value = {}
        elif isinstance(value, Mapping):
            value = dict(value)
        else:
            value = dict(as_pairs(value, where))
        node[name] = value
        node = value
        names.append(name)
    return ".".join(names), node


def build_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The options tree from the config file and the flags given.

    Also returns, per option path set by a flag, the flag's name (to blame the right one for an
    error), and the notices to log (old flag names).
    """
    tree: dict[str, Any] = _load_config(args.config) if args.config is not None else {}
    by_flag: dict[str, str] = {}
    notices: list[str] = []
    for index, flag in enumerate(FLAGS):
        value = getattr(args, f"flag_{index}")
        if value is None and flag.repeat:
            value = _UNSET
        name = flag.names[0]
        renamed = getattr(args, f"renamed_{index}", _UNSET)
        if renamed is not _UNSET:
            old = next(old for old, new in RENAMED.items() if new == name)
            notices.append(f"{old} is now {name} ({flag.help.split(' (')[0]}); the old name still works")
            if value is _UNSET:
                value, name = renamed, old
        if value is _UNSET:
            continue
        if flag.path[-1] == "handler_options":  # entries added to the file's, not replacing them
            where, entries = _node(tree, flag.path)
            entries.update(value)
        else:
            parent, node = _node(tree, flag.path[:-1])
            node[flag.path[-1]] = value
            where = f"{parent}.{flag.path[-1]}" if parent else flag.path[-1]
        by_flag[where] = name
    _, websocket = _node(tree, WEBSOCKET)
    if "handler_module" not in websocket and "resources" not in websocket:
        websocket["handler_module"] = "pywsserver.echo"
    return tree, by_flag, notices


def _explain(error: OptionError, config: str | None, by_flag: Mapping[str, str]) -> str:
    """The error's line, saying where the faulty value came from: a flag or the config file."""
    for path, flag in by_flag.items():
        if error.path == path or error.path.startswith(path + "."):
            return f"{flag}: {error}"
    if config is not None:
        return f"{config}: {error}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the server, return the exit status."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # handlers import from the current directory, as with python -m
    args = _parser().parse_args(argv)
    if args.version:
        print(describe_version())
        return 0
    by_flag: dict[str, str] = {}
    try:
        options, by_flag, notices = build_options(args)
        processes = options.get("processes", 1)
        configure_logging(
            args.log_level, several_processes=isinstance(processes, int) and processes > 1, log_format=args.log_format
        )
        for notice in notices:
            logger.warning("%s", notice)
        if args.backend == "trio" and importlib.util.find_spec("trio") is None:
            raise CommandLineError("--backend trio needs trio: pip install 'pywsserver[trio]'")
        run(options, backend=args.backend)
    except CommandLineError as error:
        print(f"pywsserver: {error}", file=sys.stderr)
        return 2
    except OptionError as error:
        print(f"pywsserver: {_explain(error, args.config, by_flag)}", file=sys.stderr)
        return 2
    except ServerStartError as error:
        print(f"pywsserver: {error}", file=sys.stderr)
        return 1
    except RestartIntensityExceeded as error:
        print(f"pywsserver: the server gave up: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
