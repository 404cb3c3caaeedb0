"""A handler that answers every message with the id of the server process serving it."""

from __future__ import annotations

import os
from typing import Any


def init(options: dict[str, Any]) -> None:
    return None


def handle(message: Any, state: None) -> tuple[Any, ...]:
    if isinstance(message, str):
        return ("reply", str(os.getpid()), state)
    return ("noreply", state)
