"""One cluster node as its own OS process, for the cluster tests.

``python -m tests.cluster_node URL NODE [KEY=VALUE ...]`` serves on a free port with the handler
below and a gen server registered (locally) as ``room``, prints ``READY <port>`` once serving, and
stops on SIGTERM. ``KEY=VALUE`` pairs are extra ``cluster`` options (numbers as floats, ``true``).

The handler: every connection joins ``chat``; text commands drive the cluster API and answer with
one reply each (except ``say``, whose broadcast is the answer):

``say:TEXT``            broadcast TEXT to ``chat``
``sayr:TEXT``           broadcast, then reply ``result:<delivered> <published>``
``addr``                reply ``addr:<this connection's address>``
``send:ADDR TEXT``      cluster.send; reply ``sent`` or ``error:<Class>: <message>``
``presence`` / ``nodes`` / ``count``    reply JSON
``register:NAME`` / ``unregister:NAME`` / ``whereis:NAME``
``cast:NAME TEXT``      cluster.cast the text to the gen server NAME
``stats``               reply JSON of the node's counters
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import anyio
import attrs

import pywsserver
from pywsserver import Worker, broadcast, cluster
from pywsserver.supervision import GenServer, Supervisor

NODE = ""


class Room(GenServer):
    """Broadcasts what it is cast to ``chat``, saying which node it runs on."""

    def handle_cast(self, message: Any) -> None:
        broadcast("chat", f"room@{NODE}: {message}")


class Handler:
    def init(self, options: dict[str, Any]) -> Worker:
        worker: Worker = options["worker"]
        worker.join("chat")
        return worker

    async def handle(self, message: object, worker: Worker) -> tuple[Any, ...]:
        if not isinstance(message, str):
            return ("noreply", worker)
        command, _, argument = message.partition(":")
        try:
            answer = await self.command(command, argument, worker)
        except Exception as error:
            answer = f"error:{type(error).__name__}: {error}"
        if answer is None:
            return ("noreply", worker)
        return ("reply", answer, worker)

    async def command(self, command: str, argument: str, worker: Worker) -> str | None:
        if command == "say":
            broadcast("chat", argument)
            return None
        if command == "sayr":
            result = broadcast("chat", argument)
            return f"result:{result.delivered} {result.published}"
        if command == "addr":
            return f"addr:{worker.address}"
        if command == "send":
            target, _, text = argument.partition(" ")
            await cluster.send(target, text)
            return "sent"
        if command == "presence":
            return json.dumps(await cluster.presence("chat"))
        if command == "nodes":
            return json.dumps(await cluster.nodes())
        if command == "count":
            return json.dumps(await cluster.count("chat"))
        if command == "register":
            await cluster.register(argument)
            return "registered"
        if command == "unregister":
            await cluster.unregister(argument)
            return "unregistered"
        if command == "whereis":
            return f"whereis:{await cluster.whereis(argument)}"
        if command == "cast":
            name, _, text = argument.partition(" ")
            await cluster.cast(name, text)
            return "cast"
        if command == "stats":
            return json.dumps(attrs.asdict(cluster.stats()))  # type: ignore[arg-type]
        return f"unknown command {command!r}"


async def main(url: str, node: str, extra: list[str]) -> None:
    global NODE
    NODE = node
    options: list[tuple[str, Any]] = [("url", url), ("node", node)]
    for item in extra:
        key, _, value = item.partition("=")
        options.append((key, True if value == "true" else float(value)))
    server_options = [
        ("port", 0),
        ("cluster", options),
        ("worker_options", [("protocol_modules", [("websocket", [("handler_module", Handler)])])]),
    ]
    tree = Supervisor(
        [Room.child_spec("room", name="room"), pywsserver.server_child_spec(server_options, id="server")],
        name=None,
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with tree.running():
            server = tree.which_children()[1].ref
            print(f"READY {server.port}", flush=True)
            async for _ in signals:
                return


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
