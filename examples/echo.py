"""The smallest server: the original's options, in Python, with the built-in echo handler.

Run it with ``python examples/echo.py`` (Ctrl+C stops it), then talk to it::

    python -m websockets ws://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import logging

import pywsserver


def options(port: int) -> list[tuple[str, object]]:
    return [
        ("port", port),
        ("number_of_workers", 10),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])]),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pywsserver.run(options(parser.parse_args().port))
