"""The command line: ``python -m pywsserver`` / ``pywsserver`` runs a server until Ctrl+C."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._errors import OptionError, ServerStartError
from ._server import run
from .supervision import RestartIntensityExceeded

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pywsserver",
        description="Run a pywsserver WebSocket server (the built-in echo handler by default).",
    )
    parser.add_argument(
        "--handler",
        default="pywsserver.echo",
        help="the handler module: package.module or package.module:attr (default: pywsserver.echo)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080; 0 picks a free port)")
    parser.add_argument("--workers", type=int, default=10, help="acceptors accepting in parallel (default: 10)")
    parser.add_argument(
        "--max-connections", type=int, default=10000, help="connections served at once (default: 10000)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="server processes sharing the port, under a supervising parent"
    )
    parser.add_argument(
        "--cluster-url",
        help="join the cluster on this Redis server (redis://host:port/db): groups, broadcast and send "
        "reach every process and machine with the same URL (needs pywsserver[redis])",
    )
    parser.add_argument("--unix-path", help="listen on this Unix socket instead of TCP")
    parser.add_argument("--certfile", help="serve wss:// with this certificate chain (PEM)")
    parser.add_argument("--keyfile", help="the private key of --certfile (PEM), if not in it")
    parser.add_argument("--health-check-path", help="a path answered 200 OK to plain GET/HEAD, e.g. /healthz")
    parser.add_argument(
        "--no-compression", action="store_true", help="do not negotiate permessage-deflate (on by default)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"], help="default: asyncio")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the server, return the exit status."""
    args = _parser().parse_args(argv)
    process = " [%(process)d]" if args.processes > 1 else ""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s",
    )
    websocket: list[tuple[str, object]] = [("handler_module", args.handler)]
    if args.no_compression:
        websocket.append(("compression", None))
    modules: list[tuple[str, object]] = [("websocket", websocket)]
    if args.health_check_path is not None:
        modules.append(("http", [("health_check_path", args.health_check_path)]))
    options: list[tuple[str, object]] = [
        ("host", args.host),
        ("port", args.port),
        ("number_of_workers", args.workers),
        ("max_connections", args.max_connections),
        ("unix_path", args.unix_path),
        ("processes", args.processes),
        ("worker_options", [("protocol_modules", modules)]),
    ]
    if args.cluster_url is not None:
        options.append(("cluster", [("url", args.cluster_url)]))
    if args.certfile is not None:
        options.append(("tls", [("certfile", args.certfile), ("keyfile", args.keyfile)]))
    elif args.keyfile is not None:
        print("pywsserver: --keyfile needs --certfile", file=sys.stderr)
        return 2
    try:
        run(options, backend=args.backend)
    except (OptionError, ServerStartError) as error:
        print(f"pywsserver: {error}", file=sys.stderr)
        return 2
    except RestartIntensityExceeded as error:
        print(f"pywsserver: the server gave up: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
