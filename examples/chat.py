"""A chat room: a supervised room process, a process group, one worker per client.

The tree::

    Supervisor (one_for_one)
    ├── ChatRoom        a GenServer registered as "chat_room"
    └── the WebSocket server (its own subtree)

Each connection's worker joins the "chat" group (and leaves it when the
connection closes, whatever the reason). Every text a client sends goes to
the room, which broadcasts it to the group: the frame is encoded once, and a
client that does not keep up misses messages instead of slowing the others.
The room also tells everyone who joined and who left (with the close code the
connection ended with), and logs both. If the room crashes it is restarted, and
clients that write meanwhile are told to try again.

What the server sends is one JSON object per text message::

    {"type": "joined", "who": "ann", "members": 2}
    {"type": "said", "who": "ann", "text": "hello"}
    {"type": "left", "who": "bob", "code": 1001, "members": 1}
    {"type": "busy", "text": "the room is busy or restarting, try again"}

A client names itself with the query string (``/ws?name=ann``); without a
usable name it is ``guest-<connection id>``.

Run it with ``python examples/chat.py``, then open http://127.0.0.1:8080/ in a few browser tabs
(the server serves the page ``chat.html`` beside the WebSocket endpoint ``/ws``), or connect
other clients::

    python -m websockets ws://127.0.0.1:8080/ws?name=ann

Across several processes (each with its own room and tree, sharing the port), joined into one
cluster by Redis so that the broadcasts reach the clients of every process (the join and leave
notices then carry no member count: ``"members": null``; each process logs its own)::

    python examples/chat.py --processes 2 --cluster-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pywsserver
from pywsserver import ConnectionClose, Worker, broadcast, groups
from pywsserver.supervision import Caller, GenServer, MailboxFull, NotRunning, Supervisor, cast

log = logging.getLogger("chat")


NORMAL_CLOSES = (1000, 1001)  # the client closed the tab or left the page, or the server is stopping
BUSY = json.dumps({"type": "busy", "text": "the room is busy or restarting, try again"})


def member_name(query: str, connection_id: int) -> str:
    """The name a client asked for (``?name=ann``): 1 to 24 printable characters, else a guest name."""
    names = urllib.parse.parse_qs(query, max_num_fields=8).get("name", [])
    name = names[0].strip() if names else ""
    if 0 < len(name) <= 24 and name.isprintable():
        return name
    return f"guest-{connection_id}"


class ChatRoom(GenServer):
    """Broadcasts what members say, who joined and who left, to the "chat" group; counts the messages.

    In a cluster (``clustered``) the notices say no member count: this process knows only its own
    members, and the cluster's presence is as of each node's last heartbeat.
    """

    def init(self, clustered: bool = False) -> None:
        self.said = 0
        self.clustered = clustered

    def handle_cast(self, message: Any) -> None:
        kind, who, detail = message
        if kind == "say":
            self.said += 1
            result = broadcast("chat", json.dumps({"type": "said", "who": who, "text": detail}))
            if result.dropped:
                log.warning("%d members missed message %d", result.dropped, self.said)
        elif kind == "joined":
            members = groups.count("chat")
            peer, origin = detail
            log.info("%r joined from %s, origin %r (%d here)", who, peer, origin, members)
            shown = None if self.clustered else members
            broadcast("chat", json.dumps({"type": "joined", "who": who, "members": shown}))
        elif kind == "left":
            members = groups.count("chat")
            code, reason = detail
            if code in NORMAL_CLOSES:
                log.info("%r left: connection closed with %d %r (%d here)", who, code, reason, members)
            else:
                log.warning("%r left: connection ended abnormally with %d %r (%d here)", who, code, reason, members)
            shown = None if self.clustered else members
            broadcast("chat", json.dumps({"type": "left", "who": who, "code": code, "members": shown}))

    def handle_call(self, request: Any, caller: Caller) -> Any:
        if request == "members":
            return groups.count("chat")
        if request == "said":
            return self.said
        raise ValueError(f"unknown request {request!r}")


@dataclass
class Member:
    """A connection's state: its worker and the name it chats under."""

    worker: Worker
    name: str


def tell_room(message: tuple[str, str, Any]) -> bool:
    """Hand a message to the room; False when the room is restarting or its mailbox is full."""
    try:
        cast("chat_room", message)
    except (NotRunning, MailboxFull):
        return False
    return True


class ChatHandler:
    """One per connection: joins the "chat" group, hands what the client says to the room."""

    def init(self, options: dict[str, Any]) -> Member:
        worker: Worker = options["worker"]
        member = Member(worker, member_name(options["query"], options["connection_id"]))
        worker.join("chat")  # left automatically when the connection closes
        peer = options["peer"]
        origin = options["headers"].get("origin")  # a browser's page says where it was loaded from
        tell_room(("joined", member.name, (f"{peer[0]}:{peer[1]}" if peer else "a unix socket", origin)))
        return member

    def handle(self, message: object, member: Member) -> tuple[Any, ...]:
        if isinstance(message, str):
            if not tell_room(("say", member.name, message)):
                return ("reply", BUSY, member)
        elif isinstance(message, ConnectionClose):
            member.worker.leave("chat")  # now, so that the room counts the members left
            tell_room(("left", member.name, (message.code, message.reason)))
        return ("noreply", member)


def chat_tree(port: int = 8080, *, cluster_url: str | None = None, reuse_port: bool = False) -> Supervisor:
    """The whole application as one supervision tree (a node of the cluster at ``cluster_url``, if given)."""
    page = (Path(__file__).with_name("chat.html")).read_bytes()
    server_options: list[tuple[str, Any]] = [
        ("port", port),
        ("reuse_port", reuse_port),
        ("cluster", cluster_url),
        (
            "worker_options",
            [
                (
                    "protocol_modules",
                    [
                        ("http", [("pages", [("/", page)])]),  # the browser page, beside the endpoint
                        ("websocket", [("resources", [("/ws", [("handler_module", ChatHandler)])])]),
                    ],
                )
            ],
        ),
    ]
    return Supervisor(
        [
            ChatRoom.child_spec("room", cluster_url is not None, name="chat_room"),
            pywsserver.server_child_spec(server_options, id="server"),
        ],
        strategy="one_for_one",
        intensity=5,
        period=10,
        name="chat",
    )


def run_processes(count: int, port: int, cluster_url: str | None) -> None:
    """Fork ``count`` processes running the whole tree on one port (SO_REUSEPORT); SIGINT/SIGTERM stops them."""
    children = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)
                pywsserver.run(chat_tree(port, cluster_url=cluster_url, reuse_port=True))  # until SIGTERM
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    try:
        signal.sigwait(_WAITED)  # Ctrl+C, SIGTERM, or a process that ended: stop them all
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


_WAITED = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A WebSocket chat room")
    parser.add_argument("--port", type=int, default=8080, help="default: 8080 (0: any free port)")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"], help="default: asyncio")
    parser.add_argument("--processes", type=int, default=1, help="processes sharing the port (default: 1)")
    parser.add_argument("--cluster-url", help="join the processes (and machines) on this Redis server (asyncio)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s [%(process)d] %(name)s: %(message)s")
    if args.processes > 1:
        if args.cluster_url is None:
            log.warning("without --cluster-url each process is a chat room of its own")
        signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)  # delivered to sigwait, not to handlers
        run_processes(args.processes, args.port, args.cluster_url)
    else:
        # Runs the tree until Ctrl+C or SIGTERM, then stops it gracefully (clients get 1001).
        pywsserver.run(chat_tree(args.port, cluster_url=args.cluster_url), backend=args.backend)
