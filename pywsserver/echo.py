"""The built-in echo handler: text comes back as text, binary as binary.

It is the default handler of ``python -m pywsserver`` and a minimal example
of the handler contract::

    ("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])])
"""

from __future__ import annotations

from typing import Any

__all__ = ["handle", "init"]


def init(options: dict[str, Any]) -> None:
    """No state is needed to echo."""
    return None


def handle(message: object, state: None) -> tuple[Any, ...]:
    """Reply with text and binary messages as they came; ignore everything else."""
    if isinstance(message, str | bytes):
        return ("reply", message, state)
    return ("noreply", state)
