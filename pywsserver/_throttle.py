"""Log reports that cannot flood the log: at most one line per kind of event per interval.

Hostile or broken clients cause the same event again and again (a bad
handshake, a protocol violation, a failed TLS handshake). Each is worth
knowing about, but a line per event would let any client fill the disk. A
`ThrottledReport` logs the first event of a kind, then counts the
others during ``interval`` seconds, and its next line says how many were not
shown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

__all__ = ["ThrottledReport"]


class ThrottledReport:
    """Logs at most one line per kind every ``interval`` seconds, counting those it holds back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.INFO) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._kinds: dict[str, list[float]] = {}  # kind -> [time of the last line, events held back]
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget what was reported: the next event of each kind is logged."""
        with self._lock:
            self._kinds.clear()

    def __call__(self, kind: str, detail: str, extra: Mapping[str, object] | None = None) -> None:
        """Report one event of ``kind`` (e.g. ``"bad handshakes"``) with ``detail`` (peer and reason).

        ``extra`` becomes attributes of the log record (the connection's id and peer).
        """
        if not self.logger.isEnabledFor(self.level):
            return
        now = time.monotonic()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return
            held_back = int(entry[1]) if entry is not None else 0
            self._kinds[kind] = [now, 0]
        more = f" (and {held_back} more in the last {self.interval:g}s, not shown)" if held_back else ""
        self.logger.log(self.level, "%s: %s%s", kind, detail, more, extra=extra)
