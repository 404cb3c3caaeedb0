"""Log formats for the command line and for applications: `JSONFormatter`, one JSON object per line."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["JSONFormatter"]

#: The attributes every `logging.LogRecord` has; any other attribute came from ``extra`` and is a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line, for log shippers.

    The keys: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``process``,
    ``message`` (the formatted message), ``exception`` (the traceback, when
    there is one), then every field the record was given through ``extra``
    (a connection's records carry ``connection_id`` and ``peer``; the access
    log's carry ``path``, ``status``, ``close_code``, ``bytes_in``, ...).
    Values JSON cannot hold are written as their ``repr``. Newlines and
    control characters inside values are escaped, so a line is a record.
    Use it with the command line's ``--log-format json``, or in your own
    logging configuration::

        handler = logging.StreamHandler()
        handler.setFormatter(pywsserver.JSONFormatter())
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=repr)
