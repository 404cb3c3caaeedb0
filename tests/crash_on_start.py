"""A handler module for the process-supervision test: importing it makes every server process die
as soon as its acceptors start (the parent imports the handler before forking)."""

from __future__ import annotations

import os
from typing import Any

import pywsserver._server


async def _die(listener: Any) -> Any:
    os._exit(3)


pywsserver._server.accept = _die  # type: ignore[assignment]


def init(options: dict[str, Any]) -> None:
    return None


def handle(message: Any, state: None) -> tuple[str, None]:
    return ("noreply", state)
