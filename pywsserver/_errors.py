"""Errors of the WebSocket server (the supervision layer has its own)."""

from __future__ import annotations

from ._optionkit import OptionError

__all__ = ["ConnectionClosed", "OptionError", "ServerStartError"]


class ConnectionClosed(Exception):
    """``send``/``ping``/``close`` was called on a worker whose connection is gone."""


class ServerStartError(RuntimeError):
    """The server could not start (for instance, its port is already in use)."""
