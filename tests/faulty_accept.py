"""A handler module for the CLI test of a tree that gives up: importing it breaks every accept.

The CLI imports the handler while parsing options, before the server is built, so the server's
acceptors pick up the broken accept below.
"""

from __future__ import annotations

from typing import Any

import pywsserver._server


async def _broken_accept(listener: Any, lock: Any) -> Any:
    raise RuntimeError("accept is broken on purpose")


pywsserver._server.accept = _broken_accept  # type: ignore[assignment]


def init(options: dict[str, Any]) -> None:
    return None


def handle(message: Any, state: None) -> tuple[str, None]:
    return ("noreply", state)
