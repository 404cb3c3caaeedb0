"""Hypothesis drives random interleavings of client actions and handler faults against a live server.

Clients connect, send, make their handler crash, close cleanly, or vanish mid-frame with a TCP reset,
in any order. After every step: every echo came back on its own connection, and no handler was told
of its close more than once. At the end: every handler whose ``init`` ran was told exactly once, and
nothing is left running.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from wsproto.events import CloseConnection, TextMessage

from pywsserver import start_link

from .recorder import Recorder, server_options
from .reliability_tools import masked_frame, reset
from .wstools import RawClient


class LiveServer(RuleBasedStateMachine):
    backend = "asyncio"
    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.portal = self.stack.enter_context(anyio.from_thread.start_blocking_portal(self.backend))
        self.recorder: Recorder = self.portal.call(Recorder)
        options = server_options(self.recorder, websocket=[("ping_interval", None)])
        self.server: Any = self.stack.enter_context(self.portal.wrap_async_context_manager(start_link(options)))
        self.connected = 0
        self.sent: dict[int, int] = {}
        self.open: dict[int, RawClient] = {}

    # ------------------------------------------------------------- actions

    @rule(target=clients)
    def connect(self) -> tuple[int, RawClient]:
        number = self.connected
        self.connected += 1
        client = self.portal.call(RawClient.connect, self.server.port, f"/client/{number}")
        self.sent[number] = 0
        self.open[number] = client
        return (number, client)

    @rule(entry=clients, count=st.integers(1, 5))
    def echo(self, entry: tuple[int, RawClient], count: int) -> None:
        number, client = entry

        async def exchange() -> None:
            for _ in range(count):
                text = f"{number}:{self.sent[number]}"
                self.sent[number] += 1
                await client.send(TextMessage(data=text))
                assert await client.next_event() == TextMessage(data=text)  # its own echo, in order

        self.portal.call(exchange)

    @rule(entry=consumes(clients))
    def crash_the_handler(self, entry: tuple[int, RawClient]) -> None:
        number, client = entry
        del self.open[number]

        async def crash() -> None:
            await client.send(TextMessage(data="raise"))
            event = await client.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1011
            await client.send(event.response())
            await client.aclose()

        self.portal.call(crash)

    @rule(entry=consumes(clients))
    def close_cleanly(self, entry: tuple[int, RawClient]) -> None:
        number, client = entry
        del self.open[number]

        async def close() -> None:
            await client.send(CloseConnection(code=1000))
            event = await client.next_event()
            assert isinstance(event, CloseConnection)
            await client.aclose()

        self.portal.call(close)

    @rule(entry=consumes(clients), cut=st.integers(1, 200))
    def vanish_mid_frame(self, entry: tuple[int, RawClient], cut: int) -> None:
        number, client = entry
        del self.open[number]

        async def vanish() -> None:
            await client.send_raw(masked_frame(1, b"y" * 300)[:cut])
            await reset(client.stream)

        self.portal.call(vanish)

    # ---------------------------------------------------------- invariants

    @invariant()
    def messages_reach_their_own_connection_and_closes_are_told_once(self) -> None:
        recorder = self.recorder
        paths = [init["path"] for init in recorder.inits]
        for index, message in list(recorder.messages):
            if isinstance(message, str) and ":" in message:
                assert paths[index] == f"/client/{message.split(':')[0]}"
        told = [index for index, _ in list(recorder.closes)]
        assert len(told) == len(set(told))

    def teardown(self) -> None:
        try:
            recorder = self.recorder

            async def settle() -> None:
                await recorder.wait_for(lambda: len(recorder.inits) == self.connected, timeout=10)
                with anyio.fail_after(10):
                    while self.server.connections and len(recorder.closes) < len(recorder.inits):
                        await anyio.lowlevel.checkpoint()

            # Whatever is still open is dropped by the client; every init must end in one close notice.
            for client in self.open.values():
                self.portal.call(client.aclose)
            self.portal.call(settle)
            assert sorted(index for index, _ in recorder.closes) == list(range(len(recorder.inits)))
        finally:
            self.stack.close()


class LiveServerOnTrio(LiveServer):
    backend = "trio"


SETTINGS = settings(max_examples=25, stateful_step_count=15, deadline=None)
TestLiveServerAsyncio = LiveServer.TestCase
TestLiveServerAsyncio.settings = SETTINGS
TestLiveServerTrio = LiveServerOnTrio.TestCase
TestLiveServerTrio.settings = SETTINGS
