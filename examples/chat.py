"""A chat room: a supervised room process, a process group, one worker per client.

The tree::

    Supervisor (one_for_one)
    ├── ChatRoom        a GenServer registered as "chat_room"
    └── the WebSocket server (its own subtree)

Each connection's worker joins the "chat" group (and leaves it when the
connection closes, whatever the reason). Every text a client sends goes to
the room, which broadcasts it to the group: the frame is encoded once, and a
client that does not keep up misses messages instead of slowing the others.
If the room crashes it is restarted, and clients that write meanwhile are
told to try again.

Run it with ``python examples/chat.py``, then open http://127.0.0.1:8080/ in a few browser tabs
(the server serves the page ``chat.html`` beside the WebSocket endpoint ``/ws``), or connect
other clients::

    python -m websockets ws://127.0.0.1:8080/ws
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import anyio

import pywsserver
from pywsserver import Worker, broadcast, groups
from pywsserver.supervision import Caller, GenServer, MailboxFull, NotRunning, Supervisor, cast

log = logging.getLogger("chat")


class ChatRoom(GenServer):
    """Broadcasts what members say to the "chat" group and counts the messages."""

    def init(self) -> None:
        self.said = 0

    def handle_cast(self, message: Any) -> None:
        kind, text = message
        if kind == "say":
            self.said += 1
            result = broadcast("chat", text)
            if result.dropped:
                log.warning("%d members missed message %d", result.dropped, self.said)

    def handle_call(self, request: Any, caller: Caller) -> Any:
        if request == "members":
            return groups.count("chat")
        if request == "said":
            return self.said
        raise ValueError(f"unknown request {request!r}")


class ChatHandler:
    """One per connection: joins the "chat" group, hands what the client says to the room."""

    def init(self, options: dict[str, Any]) -> Worker:
        worker: Worker = options["worker"]
        worker.join("chat")  # left automatically when the connection closes
        return worker

    def handle(self, message: object, worker: Worker) -> tuple[Any, ...]:
        if isinstance(message, str):
            try:
                cast("chat_room", ("say", message))
            except (NotRunning, MailboxFull):
                return ("reply", "the room is busy or restarting, try again", worker)
        return ("noreply", worker)


def chat_tree(port: int = 8080) -> Supervisor:
    """The whole application as one supervision tree."""
    page = (Path(__file__).with_name("chat.html")).read_bytes()
    server_options = [
        ("port", port),
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
        [ChatRoom.child_spec("room", name="chat_room"), pywsserver.server_child_spec(server_options, id="server")],
        strategy="one_for_one",
        intensity=5,
        period=10,
        name="chat",
    )


async def main(port: int) -> None:
    async with chat_tree(port).running():
        with anyio.open_signal_receiver(2, 15) as signals:
            async for _ in signals:
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A WebSocket chat room")
    parser.add_argument("--port", type=int, default=8080)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    anyio.run(main, parser.parse_args().port)
