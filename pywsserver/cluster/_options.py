"""The ``cluster`` option: parsed and checked here, without touching the network."""

from __future__ import annotations

import importlib.util
import re
from typing import Any
from urllib.parse import urlsplit

import attrs

from .._optionkit import OptionError, as_mapping, check_bool, check_int, check_number, join

__all__ = ["ClusterOptions", "parse_cluster"]

_LEVEL = (
    "url",
    "node",
    "prefix",
    "heartbeat_interval",
    "node_timeout",
    "connect_timeout",
    "wait_for_redis",
    "max_backoff",
    "publish_queue",
    "publish_queue_bytes",
    "send_timeout",
    "log_interval",
)

#: Node names and key prefixes: what reads well in a Redis key and in a log line, and has no ``/``
#: (the separator of an address's text form).
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@attrs.frozen
class ClusterOptions:
    """``cluster``: the Redis server that joins this server's processes and machines into one cluster."""

    #: The Redis server: ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS) or ``unix:///path``.
    url: str
    #: This node's name, unique in the cluster; ``None``: ``<host name>-<process id>`` (with ``processes``,
    #: each process gets ``<node>-<slot>``).
    node: str | None = None
    #: Prefix of every Redis key and channel the cluster uses (several clusters can share one Redis).
    prefix: str = "pywsserver"
    #: Seconds between two presence heartbeats of a node.
    heartbeat_interval: float = 1.0
    #: Seconds after its last heartbeat a node that died (SIGKILL, power loss) leaves the presence.
    node_timeout: float = 5.0
    #: Seconds to connect to Redis and for each Redis command (a presence query, a heartbeat).
    connect_timeout: float = 5.0
    #: Start even when Redis is unreachable and keep trying (default: the start fails with an error).
    wait_for_redis: bool = False
    #: The longest wait, in seconds, between two attempts to reconnect to Redis.
    max_backoff: float = 5.0
    #: Messages waiting to be published at most; beyond, a broadcast's publish fails at once.
    publish_queue: int = 10000
    #: Bytes of publishes held for the end of a step or not yet taken by Redis's socket at most;
    #: beyond, a publish fails at once (a broadcast larger than this never crosses nodes).
    publish_queue_bytes: int = 64 * 1024 * 1024
    #: Default seconds `pywsserver.cluster.send` and ``cast`` wait for the target node's answer.
    send_timeout: float = 5.0
    #: Seconds between two log lines about the same cluster fault (a failed publish, a lost link).
    log_interval: float = 10.0


def parse_cluster(raw: Any, path: str = "cluster") -> ClusterOptions:
    """Check the ``cluster`` option (pairs or a dict); every error names the option's full path."""
    if isinstance(raw, ClusterOptions):
        return raw
    if isinstance(raw, str):  # the URL alone
        raw = [("url", raw)]
    options = as_mapping(raw, path, allowed=_LEVEL)
    if "url" not in options:
        raise OptionError(join(path, "url"), "required: the Redis server, e.g. 'redis://127.0.0.1:6379/0'")
    url = options["url"]
    if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise OptionError(
            join(path, "url"), f"expected a redis://, rediss:// or unix:// URL of a Redis server, got {url!r}"
        )
    if importlib.util.find_spec("redis") is None:
        raise OptionError(path, "the cluster needs the redis package: pip install 'pywsserver[redis]'")
    fields: dict[str, Any] = {"url": url}
    for name in ("node", "prefix"):
        if options.get(name) is not None:
            value = options[name]
            if not isinstance(value, str) or not _NAME.match(value):
                raise OptionError(
                    join(path, name), f"expected 1 to 100 characters of letters, digits and _.:-, got {value!r}"
                )
            fields[name] = value
    for name in ("heartbeat_interval", "node_timeout", "connect_timeout", "max_backoff", "send_timeout"):
        if name in options:
            fields[name] = check_number(options[name], join(path, name), minimum=0.01)
    if "log_interval" in options:
        fields["log_interval"] = check_number(options["log_interval"], join(path, "log_interval"))
    if "wait_for_redis" in options:
        fields["wait_for_redis"] = check_bool(options["wait_for_redis"], join(path, "wait_for_redis"))
    for name in ("publish_queue", "publish_queue_bytes"):
        if name in options:
            fields[name] = check_int(options[name], join(path, name), minimum=1)
    parsed = ClusterOptions(**fields)
    if parsed.node_timeout < 2 * parsed.heartbeat_interval:
        raise OptionError(
            join(path, "node_timeout"),
            f"expected at least twice heartbeat_interval ({2 * parsed.heartbeat_interval:g}), "
            f"got {parsed.node_timeout:g}: one late heartbeat would drop a live node",
        )
    return parsed
