"""A chat room: a supervised room process and one worker per connected client.

The tree::

    Supervisor (one_for_one)
    ├── ChatRoom        a GenServer registered as "chat_room"
    └── the WebSocket server (its own subtree)

Every text a client sends is broadcast to everyone in the room. The room
never blocks on a slow client: it uses ``send_nowait`` and drops a member
whose mailbox is full. If the room crashes it is restarted empty, and clients
join again with their next message.

Run it with ``python examples/chat.py`` and connect several clients::

    python -m websockets ws://127.0.0.1:8080/
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import anyio

import pywsserver
from pywsserver import ConnectionClose, ConnectionClosed, Worker
from pywsserver.supervision import Caller, GenServer, MailboxFull, NotRunning, Supervisor, cast

log = logging.getLogger("chat")


class ChatRoom(GenServer):
    """Keeps the members and broadcasts what they say."""

    def init(self) -> None:
        self.members: set[Worker] = set()

    def handle_cast(self, message: Any) -> None:
        kind, worker, *rest = message
        if kind == "leave":
            self.members.discard(worker)
            return
        self.members.add(worker)
        if kind == "say":
            self.broadcast(rest[0])

    def handle_call(self, request: Any, caller: Caller) -> Any:
        if request == "count":
            return len(self.members)
        raise ValueError(f"unknown request {request!r}")

    def broadcast(self, text: str) -> None:
        for member in list(self.members):
            try:
                member.send_nowait(text)
            except (MailboxFull, ConnectionClosed):
                log.warning("dropping %r from the room: it cannot keep up", member)
                self.members.discard(member)


class ChatHandler:
    """One per connection: joins the room, says what the client sends, leaves at the end."""

    def init(self, options: dict[str, Any]) -> Worker:
        worker: Worker = options["worker"]
        cast("chat_room", ("join", worker))
        return worker

    def handle(self, message: object, worker: Worker) -> tuple[Any, ...]:
        try:
            if isinstance(message, ConnectionClose):
                cast("chat_room", ("leave", worker))
            elif isinstance(message, str):
                cast("chat_room", ("say", worker, message))
        except NotRunning:
            return ("reply", "the room is restarting, try again", worker)
        return ("noreply", worker)


def chat_tree(port: int = 8080) -> Supervisor:
    """The whole application as one supervision tree."""
    server_options = [
        ("port", port),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", ChatHandler)])])]),
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
