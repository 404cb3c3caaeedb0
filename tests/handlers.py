"""Handler modules used by the tests, in every form a handler may take."""

from __future__ import annotations

from typing import Any


def init(options: dict[str, Any]) -> str:
    return "module-state"


def handle(message: object, state: str) -> tuple[Any, ...]:
    return ("reply", f"{state}:{message}", state)


class ClassHandler:
    """One instance per connection."""

    def init(self, options: dict[str, Any]) -> int:
        return 0

    async def handle(self, message: object, count: int) -> tuple[Any, ...]:
        return ("reply", f"{count}:{message}", count + 1)


class Missing:
    def init(self, options: dict[str, Any]) -> None:
        return None
