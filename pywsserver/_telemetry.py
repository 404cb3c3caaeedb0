"""What the server sees of its connections: the access log line at each end, and the totals the metrics read.

Every connection core counts what it carries in plain integers in its slots
(bytes and messages each way, handler errors, full mailboxes). The server's
`Telemetry` is the core's observer: told when a connection starts and ends,
it writes one ``pywsserver.access`` line per connection and, when metrics are
on, adds the ended connection's counts to the server's totals. The metrics
read those totals plus the counts of the live connections (`Telemetry.totals`)
when they are scraped, so nothing here calls the metrics library per message
or per connection.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import ConnectionCore

__all__ = ["Telemetry", "access_logger"]

#: One INFO line per connection when it ends (turn it off with its level, or the ``access_log`` option).
access_logger = logging.getLogger("pywsserver.access")

#: The per-connection counts, in the order of `Telemetry.totals`.
COUNTS = ("bytes_in", "bytes_out", "messages_in", "messages_out", "handler_errors", "mailbox_full")


def _counts(core: ConnectionCore) -> tuple[int, int, int, int, int, int]:
    module_out = getattr(core._module, "messages_out", 0)
    return (
        core._bytes_in,
        core._bytes_out,
        core._messages_in,
        core._messages_out + (module_out if type(module_out) is int else 0),
        core._handler_errors,
        core._mailbox_full,
    )


def outcome(core: ConnectionCore) -> tuple[int | None, int | None, str, str | None]:
    """How the connection ended: (HTTP status, close code, close reason, who closed).

    The status is the handshake's answer (101 once upgraded, 404, ...; ``None``
    if the client got none: it left, timed out, or failed its TLS handshake).
    The close is the one the handler was told; who closed is ``"client"`` or
    ``"server"``.
    """
    module = core._module
    close = core._close
    if close is None:
        status = getattr(module, "status", None)
        return (status if type(status) is int else None), None, "", None
    closed_by = "server" if core._aborted is not None else getattr(module, "closed_by", None)
    return 101, int(close.code), close.reason, closed_by if isinstance(closed_by, str) else None


def _path(core: ConnectionCore) -> str | None:
    if core._path is not None:
        return core._path
    request = getattr(core._module, "request", None)  # a handshake refused or answered (the HTTP module)
    path = getattr(request, "path", None)
    return path if isinstance(path, str) else None


class Telemetry:
    """The observer of a server's connections (`pywsserver._core.Observer`)."""

    def __init__(self, *, access_log: bool, metrics: bool) -> None:
        #: Whether to write the access log (its logger's level is looked at too).
        self.access_log = access_log
        #: Whether to keep the totals (metrics on).
        self.metrics = metrics
        #: The live connections (only kept with metrics on).
        self.live: set[ConnectionCore] = set()
        #: Connections accepted (that reached their worker).
        self.accepted = 0
        #: The counts of the connections that ended, in the order of ``COUNTS``.
        self.ended_counts = [0] * len(COUNTS)
        #: Closes of WebSocket connections by (code, who closed).
        self.closes: collections.Counter[tuple[int, str]] = collections.Counter()
        #: Handshakes refused, by HTTP status.
        self.refused: collections.Counter[int] = collections.Counter()

    def started(self, core: ConnectionCore) -> None:
        """A connection's worker began to serve it."""
        if self.metrics:
            self.accepted += 1
            self.live.add(core)

    def ended(self, core: ConnectionCore) -> None:
        """A connection ended: log it, add its counts to the totals."""
        log = self.access_log and access_logger.isEnabledFor(logging.INFO)
        if not (log or self.metrics):
            return
        counts = _counts(core)
        status, code, reason, closed_by = outcome(core)
        if self.metrics:
            self.live.discard(core)
            ended = self.ended_counts
            for index, value in enumerate(counts):
                ended[index] += value
            if code is not None:
                self.closes[code, closed_by or "unknown"] += 1
            elif status is not None and status >= 400:
                self.refused[status] += 1
        if log:
            _log_access(core, counts, status, code, reason, closed_by)

    def totals(self) -> list[int]:
        """The counts of every connection so far, live ones included, in the order of ``COUNTS``."""
        totals = list(self.ended_counts)
        for core in self.live:
            for index, value in enumerate(_counts(core)):
                totals[index] += value
        return totals


def _log_access(
    core: ConnectionCore,
    counts: tuple[int, ...],
    status: int | None,
    code: int | None,
    reason: str,
    closed_by: str | None,
) -> None:
    duration = max(core._clock() - core._started_at, 0.0)
    path = _path(core)
    fields: dict[str, Any] = {
        "connection_id": core.connection_id,
        "peer": core._peer_text,
        "path": path,
        "subprotocol": core._subprotocol,
        "status": status,
        "close_code": code,
        "close_reason": reason if code is not None else None,
        "closed_by": closed_by,
        "duration": round(duration, 6),
        "messages_in": counts[2],
        "bytes_in": counts[0],
        "messages_out": counts[3],
        "bytes_out": counts[1],
    }
    # Untrusted text (path, subprotocol, close reason) goes in escaped (%r): one line whatever was sent.
    access_logger.info(
        "%s %r %s subprotocol=%r close=%s by %s reason=%r %.3fs in: %d msgs %d B, out: %d msgs %d B",
        fields["peer"],
        path,
        status if status is not None else "-",
        core._subprotocol,
        code if code is not None else "-",
        closed_by or "-",
        reason,
        duration,
        counts[2],
        counts[0],
        counts[3],
        counts[1],
        extra=fields,
    )
