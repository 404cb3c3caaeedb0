"""Server options: the original's nested proplist, parsed once into frozen attrs classes.

``start_link`` is the only place options are validated. Every error is an
`OptionError` naming the option's full path and what was expected, e.g.
``worker_options.protocol_modules.websocket.handler_module: module 'x' has no
function 'handle'``. Nothing here touches a socket.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import socket
import ssl
import types
from collections.abc import Mapping
from typing import Any

import attrs

from ._handler import HandlerModule
from ._optionkit import OptionError, as_mapping, check_bool, check_int, check_number, join, resolve_object
from .cluster._options import ClusterOptions, parse_cluster
from .protocols import BUILTIN_MODULES, HTTPOptions, HTTPProtocol, WebSocketOptions

__all__ = ["ModuleConfig", "ServerOptions", "WorkerOptions", "parse_options"]

_MODULE_METHODS = (
    "start",
    "data_received",
    "eof_received",
    "action",
    "timer_expired",
    "handler_returned",
    "handler_failed",
)


@attrs.frozen
class ModuleConfig:
    """One configured protocol module: its class and its parsed options."""

    #: The name other modules switch to it by.
    name: str
    #: The module class, built per connection as ``module(options, connection)``.
    module: Any
    #: What the module's ``parse_options`` returned.
    options: Any
    #: The handler module resolved from the options' ``handler_module``, if any.
    handler: HandlerModule | None = None


@attrs.frozen
class WorkerOptions:
    """``worker_options``: what every worker runs."""

    #: The configured protocol modules by name (both the given key and the module's own name).
    modules: Mapping[str, ModuleConfig]
    #: The module a new connection starts with.
    initial_module: str = "http"
    #: How many actions (send/ping/close) may wait in a worker's mailbox.
    mailbox_size: int = 64
    #: Bytes of outgoing data a connection may buffer before the worker stops taking more: it stops
    #: reading from the peer, ``await send`` waits and ``send_nowait`` raises ``MailboxFull``.
    write_buffer_size: int = 65536


@attrs.frozen
class ServerOptions:
    """The whole server's options, as parsed by `parse_options`."""

    #: What workers run.
    worker: WorkerOptions
    #: The interface to listen on; ``None`` or ``"0.0.0.0"``/``"::"`` for all.
    host: str | None = "127.0.0.1"
    #: The TCP port; 0 picks a free one (see ``Server.port``).
    port: int = 8080
    #: The acceptor pool: how many acceptor tasks accept connections (one serves every listening
    #: socket; on one event loop more do not accept faster, see docs/architecture.md).
    number_of_workers: int = 1
    #: The most connections served at once; at the bound, accepting pauses.
    max_connections: int = 10000
    #: The listening socket's backlog.
    backlog: int = 1024
    #: A name to find the server by (``whereis``).
    register: str | None = None
    #: Seconds connections get to finish their closing handshake when the server stops.
    drain_timeout: float = 10.0
    #: The TLS context for ``wss://`` (``None``: plain ``ws://``); see the ``tls`` option.
    tls: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    #: Seconds a client has to complete its TLS handshake; it runs in the connection's worker, not an acceptor.
    tls_handshake_timeout: float = 10.0
    #: Listen on this Unix socket path instead of TCP (behind a reverse proxy); ``host``/``port`` are then unused.
    unix_path: str | None = None
    #: Set ``SO_REUSEPORT`` on the listening socket, so that several processes can share the port.
    reuse_port: bool = False
    #: How many server processes `run` starts, sharing the port, under a supervising parent.
    processes: int = 1
    #: The cluster on Redis this server is a node of (``None``: groups stay within the process).
    cluster: ClusterOptions | None = None
    #: Seconds the event loop may be blocked before the watchdog reports it (``None``: no watchdog).
    loop_watchdog: float | None = 0.5
    #: Write one ``pywsserver.access`` INFO line per connection when it ends.
    access_log: bool = True
    #: Serve the Prometheus metrics on this TCP port of ``host`` too, at any path (``None``: not on a port
    #: of their own; the HTTP module's ``metrics_path`` serves them on the server's port).
    metrics_port: int | None = None

    @property
    def metrics(self) -> bool:
        """Whether metrics are on: a ``metrics_port``, or an HTTP module with a ``metrics_path``."""
        return self.metrics_port is not None or any(
            getattr(config.options, "metrics_path", None) is not None for config in self.worker.modules.values()
        )


#: The Erlang original's module names, accepted for the built-in modules (for configurations ported as they are).
ORIGINAL_MODULE_NAMES = {"wsserver_websocket_protocol": "websocket", "wsserver_http_protocol": "http"}

_TOP_LEVEL = (
    "port",
    "host",
    "number_of_workers",
    "max_connections",
    "backlog",
    "register",
    "drain_timeout",
    "worker_options",
    "tls",
    "tls_handshake_timeout",
    "unix_path",
    "reuse_port",
    "processes",
    "cluster",
    "access_log",
    "metrics_port",
    "loop_watchdog",
)
_TLS_LEVEL = ("certfile", "keyfile", "password", "client_ca", "verify_client", "minimum_version", "alpn_protocols")
_WORKER_LEVEL = ("protocol_modules", "protocol_modules_options", "initial_module", "mailbox_size", "write_buffer_size")


def _near_name(key: Any) -> str:
    """``; did you mean 'websocket'?`` for a name close to a built-in module's, else nothing."""
    if not isinstance(key, str):
        return ""
    near = difflib.get_close_matches(key, [*BUILTIN_MODULES, *ORIGINAL_MODULE_NAMES], n=1, cutoff=0.75)
    return f"; did you mean {near[0]!r}?" if near else ""


def _resolve_module(key: Any, path: str) -> Any:
    if isinstance(key, str):
        module = BUILTIN_MODULES.get(key)
        if module is None:
            try:
                module = resolve_object(key, path)
            except OptionError as error:
                raise OptionError(path, f"{str(error).removeprefix(path + ': ')}{_near_name(key)}") from None
    else:
        module = key
    if not inspect.isclass(module):
        got = f"the Python module {module.__name__!r}" if isinstance(module, types.ModuleType) else repr(module)
        raise OptionError(
            path,
            f"expected a protocol module class, a short name or a dotted path, got {got}{_near_name(key)}",
        )
    for method in _MODULE_METHODS:
        if not callable(getattr(module, method, None)):
            raise OptionError(path, f"{module.__qualname__} is not a protocol module: it has no method {method!r}")
    return module


def _parse_module(key: Any, raw: Any, path: str) -> ModuleConfig:
    module = _resolve_module(key, path)
    parse = getattr(module, "parse_options", None)
    options: Any = parse(raw, path) if parse is not None else as_mapping(raw, path)
    handler = None
    target = options.get("handler_module") if isinstance(options, Mapping) else getattr(options, "handler_module", None)
    if target is not None:
        handler = HandlerModule(target, join(path, "handler_module"))
    name = key if isinstance(key, str) and key in BUILTIN_MODULES else getattr(module, "name", None)
    if not isinstance(name, str):
        name = key if isinstance(key, str) else module.__qualname__
    return ModuleConfig(name=name, module=module, options=options, handler=handler)


def _parse_worker(raw: Any, path: str) -> WorkerOptions:
    options = as_mapping(raw, path, allowed=_WORKER_LEVEL)
    if "protocol_modules" in options and "protocol_modules_options" in options:
        raise OptionError(join(path, "protocol_modules"), "give protocol_modules or protocol_modules_options, not both")
    key = "protocol_modules" if "protocol_modules" in options else "protocol_modules_options"
    modules_path = join(path, key)
    if key not in options:
        raise OptionError(join(path, "protocol_modules"), "required: at least ('websocket', [('handler_module', ...)])")
    raw_modules = options[key]
    entries: list[tuple[Any, Any]]
    if isinstance(raw_modules, Mapping):
        entries = list(raw_modules.items())
    elif isinstance(raw_modules, list | tuple):
        entries = []
        for item in raw_modules:
            if isinstance(item, tuple | list) and len(item) == 2:
                entries.append((item[0], item[1]))
            elif isinstance(item, str) or inspect.isclass(item):
                entries.append((item, []))
            else:
                raise OptionError(modules_path, f"expected (module, options) pairs, got the item {item!r}")
    else:
        raise OptionError(modules_path, f"expected a list of (module, options) pairs or a dict, got {raw_modules!r}")
    modules: dict[str, ModuleConfig] = {}
    for module_key, module_options in entries:
        if isinstance(module_key, str):
            module_key = ORIGINAL_MODULE_NAMES.get(module_key, module_key)
        label = module_key if isinstance(module_key, str) else getattr(module_key, "name", repr(module_key))
        config = _parse_module(module_key, module_options, join(modules_path, str(label)))
        for name in {config.name, str(label)}:
            if name in modules:
                raise OptionError(join(modules_path, name), "configured twice")
            modules[name] = config
    initial = options.get("initial_module", "http")
    if not isinstance(initial, str):
        raise OptionError(join(path, "initial_module"), f"expected a protocol module name, got {initial!r}")
    if initial == "http" and "http" not in modules:
        modules["http"] = ModuleConfig("http", HTTPProtocol, HTTPProtocol.parse_options([], join(modules_path, "http")))
    if initial not in modules:
        raise OptionError(join(path, "initial_module"), f"no protocol module named {initial!r} is configured")
    for name, config in modules.items():
        target = getattr(config.options, "upgrade_to", None)
        if isinstance(target, str) and target not in modules:
            if target == "websocket":
                raise OptionError(
                    join(join(modules_path, "websocket"), "handler_module"),
                    "required: configure ('websocket', [('handler_module', your_handler)])",
                )
            raise OptionError(join(join(modules_path, name), "upgrade_to"), f"no protocol module named {target!r}")
    for name, config in list(modules.items()):
        # The handshake decides what the WebSocket endpoint serves: give it the endpoint's options.
        if isinstance(config.options, HTTPOptions):
            target = modules[config.options.upgrade_to].options
            if isinstance(target, WebSocketOptions):
                modules[name] = attrs.evolve(config, options=attrs.evolve(config.options, endpoint=target))
    mailbox_size = check_int(options.get("mailbox_size", 64), join(path, "mailbox_size"), minimum=1)
    write_buffer_size = check_int(
        options.get("write_buffer_size", 65536), join(path, "write_buffer_size"), minimum=1024
    )
    return WorkerOptions(
        modules=modules, initial_module=initial, mailbox_size=mailbox_size, write_buffer_size=write_buffer_size
    )


def parse_options(raw: Any) -> ServerOptions:
    """Parse and check the server's options (pairs or dicts, nested)."""
    if isinstance(raw, ServerOptions):
        return raw
    options = as_mapping(raw, "", allowed=_TOP_LEVEL)
    if "worker_options" not in options:
        raise OptionError(
            "worker_options", "required: [('protocol_modules', [('websocket', [('handler_module', ...)])])]"
        )
    fields: dict[str, Any] = {"worker": _parse_worker(options["worker_options"], "worker_options")}
    if "host" in options:
        host = options["host"]
        if host is not None and (not isinstance(host, str) or not host):
            raise OptionError("host", f"expected an interface name or address (str) or None, got {host!r}")
        fields["host"] = host
    if "port" in options:
        fields["port"] = check_int(options["port"], "port", minimum=0, maximum=65535)
    if "number_of_workers" in options:
        fields["number_of_workers"] = check_int(options["number_of_workers"], "number_of_workers", minimum=1)
    if "max_connections" in options:
        fields["max_connections"] = check_int(options["max_connections"], "max_connections", minimum=1)
    if "backlog" in options:
        fields["backlog"] = check_int(options["backlog"], "backlog", minimum=1)
    if "register" in options:
        name = options["register"]
        if name is not None and (not isinstance(name, str) or not name):
            raise OptionError("register", f"expected a non-empty str name or None, got {name!r}")
        fields["register"] = name
    if "drain_timeout" in options:
        fields["drain_timeout"] = check_number(options["drain_timeout"], "drain_timeout")
    if options.get("tls") is not None:
        fields["tls"] = _parse_tls(options["tls"], "tls")
    if "tls_handshake_timeout" in options:
        fields["tls_handshake_timeout"] = check_number(
            options["tls_handshake_timeout"], "tls_handshake_timeout", minimum=0.001
        )
    if options.get("unix_path") is not None:
        unix_path = options["unix_path"]
        if not isinstance(unix_path, str | os.PathLike) or not str(unix_path):
            raise OptionError("unix_path", f"expected a file system path for a Unix socket, got {unix_path!r}")
        if not hasattr(socket, "AF_UNIX"):
            raise OptionError("unix_path", "Unix sockets are not available on this platform")
        fields["unix_path"] = os.fspath(unix_path)
    if "reuse_port" in options:
        fields["reuse_port"] = check_bool(options["reuse_port"], "reuse_port")
        if fields["reuse_port"] and not hasattr(socket, "SO_REUSEPORT"):
            raise OptionError("reuse_port", "SO_REUSEPORT is not available on this platform")
    if "processes" in options:
        fields["processes"] = check_int(options["processes"], "processes", minimum=1, maximum=1024)
        if fields["processes"] > 1:
            if not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"):
                raise OptionError("processes", "several processes need SO_REUSEPORT and fork (Linux, BSD, macOS)")
            if fields.get("unix_path") is not None:
                raise OptionError("processes", "several processes cannot share a Unix socket; use one process")
    if options.get("cluster") is not None:
        fields["cluster"] = parse_cluster(options["cluster"], "cluster")
    if "loop_watchdog" in options:
        fields["loop_watchdog"] = check_number(options["loop_watchdog"], "loop_watchdog", minimum=0.01, allow_none=True)
    if "access_log" in options:
        fields["access_log"] = check_bool(options["access_log"], "access_log")
    if options.get("metrics_port") is not None:
        fields["metrics_port"] = check_int(options["metrics_port"], "metrics_port", minimum=0, maximum=65535)
        if fields["metrics_port"] == 0 and fields.get("processes", 1) > 1:
            raise OptionError("metrics_port", "several processes need a fixed port for their metrics, not 0")
        if fields["metrics_port"] == fields.get("port", 8080) != 0 and fields.get("unix_path") is None:
            raise OptionError("metrics_port", "must differ from port (or use metrics_path to share the port)")
    parsed = ServerOptions(**fields)
    if parsed.metrics:
        _check_metrics_library("metrics_port" if parsed.metrics_port is not None else _metrics_path_option(parsed))
    return parsed


def _metrics_path_option(options: ServerOptions) -> str:
    for name, config in options.worker.modules.items():
        if getattr(config.options, "metrics_path", None) is not None:
            return f"worker_options.protocol_modules.{name}.metrics_path"
    return "metrics_port"  # pragma: no cover - only called with metrics on


def _check_metrics_library(path: str) -> None:
    if importlib.util.find_spec("prometheus_client") is None:
        raise OptionError(path, "metrics need prometheus-client: pip install 'pywsserver[metrics]'")


_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _parse_tls(raw: Any, path: str) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` as given, or one built from certificate and key files."""
    if isinstance(raw, ssl.SSLContext):
        return raw
    options = as_mapping(raw, path, allowed=_TLS_LEVEL)
    if "certfile" not in options:
        raise OptionError(join(path, "certfile"), "required: the server's certificate chain (PEM file)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum = options.get("minimum_version", "TLSv1.2")
    if minimum not in _VERSIONS:
        raise OptionError(join(path, "minimum_version"), f"expected one of {', '.join(_VERSIONS)}, got {minimum!r}")
    context.minimum_version = _VERSIONS[minimum]
    for name in ("certfile", "keyfile", "client_ca"):
        value = options.get(name)
        if value is not None and not isinstance(value, str | os.PathLike):
            raise OptionError(join(path, name), f"expected a file path, got {value!r}")
    _load_cert_chain(context, options, path)
    verify = options.get("verify_client", "required" if options.get("client_ca") else "none")
    if verify not in _VERIFY:
        raise OptionError(join(path, "verify_client"), f"expected one of {', '.join(_VERIFY)}, got {verify!r}")
    if options.get("client_ca") is not None:
        _read_pem(options["client_ca"], join(path, "client_ca"))
        try:
            context.load_verify_locations(cafile=options["client_ca"])
        except (OSError, ssl.SSLError) as error:
            raise OptionError(join(path, "client_ca"), f"cannot load the CA certificates: {error}") from None
    elif verify != "none":
        raise OptionError(join(path, "client_ca"), f"required with verify_client={verify!r}: the CAs to check against")
    context.verify_mode = _VERIFY[verify]
    protocols = options.get("alpn_protocols", ["http/1.1"])
    if not isinstance(protocols, list | tuple) or not all(isinstance(p, str) for p in protocols):
        raise OptionError(join(path, "alpn_protocols"), f"expected a list of protocol names, got {protocols!r}")
    if protocols:
        context.set_alpn_protocols(list(protocols))
    return context


def _read_pem(file: Any, path: str) -> bytes:
    """The contents of a PEM file, or an `OptionError` naming the file and what is wrong with it."""
    name = os.fspath(file)
    try:
        with open(name, "rb") as stream:
            return stream.read(1 << 20)  # certificates and keys are small; this is only looked into
    except FileNotFoundError:
        raise OptionError(path, f"no such file {name!r}") from None
    except IsADirectoryError:
        raise OptionError(path, f"{name!r} is a directory, not a PEM file") from None
    except OSError as error:
        raise OptionError(path, f"cannot read {name!r}: {error.strerror or error}") from None


def _load_cert_chain(context: ssl.SSLContext, options: Mapping[str, Any], path: str) -> None:
    """Load the certificate and key; every failure names the file and what is wrong with it."""
    certfile, keyfile, password = options["certfile"], options.get("keyfile"), options.get("password")
    certificate = _read_pem(certfile, join(path, "certfile"))
    if b"-----BEGIN CERTIFICATE-----" not in certificate:
        raise OptionError(join(path, "certfile"), f"{os.fspath(certfile)!r} holds no PEM certificate")
    key_path, key_file = (join(path, "keyfile"), keyfile) if keyfile is not None else (join(path, "certfile"), certfile)
    key = _read_pem(keyfile, key_path) if keyfile is not None else certificate
    if b"PRIVATE KEY-----" not in key:
        if keyfile is None:
            raise OptionError(
                join(path, "keyfile"),
                f"required: {os.fspath(certfile)!r} holds a certificate but no private key; give the key's file",
            )
        raise OptionError(key_path, f"{os.fspath(key_file)!r} holds no PEM private key")
    if password is None and b"ENCRYPTED" in key:
        raise OptionError(join(path, "password"), f"required: the private key in {os.fspath(key_file)!r} is encrypted")
    try:
        context.load_cert_chain(certfile, keyfile, password)
    except ssl.SSLError as error:
        text = str(error)
        if "KEY_VALUES_MISMATCH" in text:
            raise OptionError(
                key_path,
                f"the private key in {os.fspath(key_file)!r} does not match the certificate in {os.fspath(certfile)!r}",
            ) from None
        if password is not None and ("BAD_DECRYPT" in text or "bad decrypt" in text or "PEM lib" in text):
            raise OptionError(
                join(path, "password"), f"cannot decrypt the private key in {os.fspath(key_file)!r}: wrong password?"
            ) from None
        raise OptionError(
            join(path, "certfile"),
            f"cannot load the certificate {os.fspath(certfile)!r} with the key in {os.fspath(key_file)!r}: {error}",
        ) from None
    except OSError as error:
        raise OptionError(join(path, "certfile"), f"cannot load {os.fspath(certfile)!r}: {error}") from None
