"""Checks for nested options: every failure names the option's full path and what was expected.

Options arrive as the original's proplists (lists of ``(key, value)`` pairs)
or as dicts, nested. These helpers turn one level into a dict and check
values; `._options` and each protocol module's ``parse_options`` use them.
"""

from __future__ import annotations

import importlib
import math
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OptionError", "as_mapping", "check_bool", "check_number", "check_int", "resolve_object"]


class OptionError(ValueError):
    """An option is invalid; the message starts with the option's full path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        #: The option's full path, e.g. ``worker_options.protocol_modules.websocket.handler_module``.
        self.path = path


def join(path: str, key: str) -> str:
    """``path.key``, or ``key`` at the top level."""
    return f"{path}.{key}" if path else key


def as_pairs(value: Any, path: str, what: str = "(key, value)") -> list[tuple[Any, Any]]:
    """A dict or a list of pairs as a list of pairs, in order (keys unchecked, repeats kept)."""
    label = path or "options"
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise OptionError(label, f"expected {what} pairs or a dict, got the item {item!r}")
            items.append((item[0], item[1]))
        return items
    raise OptionError(label, f"expected a list of {what} pairs or a dict, got {value!r}")


def as_mapping(value: Any, path: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """One level of options as a dict; pairs and dicts are accepted, unknown keys refused."""
    label = path or "options"
    items = as_pairs(value, path)
    result: dict[str, Any] = {}
    for key, item in items:
        if not isinstance(key, str):
            raise OptionError(label, f"option names must be str, got {key!r}")
        if key in result:
            raise OptionError(join(path, key), "given twice")
        result[key] = item
    if allowed is not None:
        known = sorted(allowed)
        for key in result:
            if key not in known:
                raise OptionError(join(path, key), f"unknown option; expected one of {', '.join(known)}")
    return result


def check_number(value: Any, path: str, *, minimum: float = 0.0, allow_none: bool = False) -> float | None:
    """A number of seconds (or similar) >= ``minimum``; ``None`` allowed when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < minimum:
        extra = " or None" if allow_none else ""
        raise OptionError(path, f"expected a number >= {minimum:g}{extra}, got {value!r}")
    return float(value)


def check_int(value: Any, path: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """An int within bounds."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        raise OptionError(path, f"expected an int >= {minimum}{bound}, got {value!r}")
    return value


def check_bool(value: Any, path: str) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise OptionError(path, f"expected True or False, got {value!r}")
    return value


def resolve_object(reference: str, path: str) -> Any:
    """Import ``"package.module:attr"``, ``"package.module.attr"`` or ``"package.module"``.

    An error raised while importing a module that exists (its own ``import
    requests`` failing, a syntax error) is reported as it is, naming where it happened.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise OptionError(path, f"expected package.module or package.module:attr, got {reference!r}")
    try:
        if attribute:
            target: Any = _import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
            return target
        try:
            return _import_module(module_name)
        except ModuleNotFoundError as error:
            parent, _, name = module_name.rpartition(".")
            if not parent or error.name != module_name:  # something the module imports is missing
                raise
            return getattr(_import_module(parent), name)
    except (ImportError, AttributeError) as error:
        raise OptionError(path, f"cannot import {reference!r}: {error}") from None


class _ImportFailed(ImportError):
    """A module exists but raised while being imported."""


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        if isinstance(error, SyntaxError):
            where = ""  # its message says where
        raise _ImportFailed(f"importing {name} raised {type(error).__name__}: {error}{where}") from error
