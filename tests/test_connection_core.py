"""The connection core under a fake driver: no socket, no transport, the core's life and its asks of a driver."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request, TextMessage

from pywsserver import ConnectionClose, WorkerState
from pywsserver._asyncio_driver import ProtocolDriver, make_socket_transport
from pywsserver._core import ConnectionCore
from pywsserver._options import parse_options

from .recorder import Recorder, server_options

pytestmark = pytest.mark.anyio


class FakeDriver:
    """A driver that records what the core asks and feeds it what the test sends."""

    def __init__(self, core: ConnectionCore) -> None:
        self.core = core
        self.written = bytearray()
        self.asked: list[Any] = []
        self.send_input, self.inputs = anyio.create_memory_object_stream[tuple[str, Any]](10)
        core._writer = self
        core._can_write = True

    def write(self, data: bytes) -> None:
        self.written += data

    def addresses(self) -> tuple[Any, Any]:
        return ("192.0.2.1", 40000), ("192.0.2.2", 80)

    async def serve(self) -> None:
        core = self.core
        core._feed(core._module.start(b"", {}))
        async with self.inputs:
            async for kind, value in self.inputs:
                if kind == "data":
                    core._input("data", value)
                elif kind == "lost":
                    core._on_lost()
                elif kind == "timers":
                    core._timers_due()
                while core._busy and not core._stopped:  # what a driver's task does: the async handler calls
                    await core._call_async_handler()
                if core._stopped:
                    return

    async def drain(self) -> None:
        self.asked.append("drain")

    def close_socket(self) -> None:
        self.asked.append("close_socket")

    def abort(self) -> None:
        self.asked.append("abort")

    async def closed(self) -> None:
        self.asked.append("closed")

    def pause_reading(self) -> None:
        self.asked.append("pause_reading")

    def resume_reading(self) -> None:
        self.asked.append("resume_reading")

    def wake(self) -> None:
        pass

    def wake_at(self, deadline: float) -> None:
        self.asked.append(("wake_at", deadline))

    def cancel_timer(self) -> None:
        self.asked.append("cancel_timer")

    def flush_soon(self) -> None:
        self.asked.append("flush_soon")


def _core(recorder: Recorder, released: list[list[Any]], **websocket: Any) -> tuple[ConnectionCore, FakeDriver]:
    options = parse_options(server_options(recorder, websocket=list(websocket.items())))
    core = ConnectionCore(options.worker, release=lambda: released.append(list(driver.asked)))
    driver = FakeDriver(core)
    core._attach(driver)
    return core, driver


def _client_events(client: WSConnection, driver: FakeDriver) -> list[Any]:
    client.receive_data(bytes(driver.written))
    driver.written.clear()
    return list(client.events())


async def test_a_connection_served_by_a_fake_driver_from_handshake_to_close() -> None:
    recorder = Recorder()
    released: list[list[Any]] = []
    core, driver = _core(recorder, released)
    assert core.connection.peer == ("192.0.2.1", 40000)
    client = WSConnection(ConnectionType.CLIENT)
    async with anyio.create_task_group() as tg:
        tg.start_soon(core.run)
        await driver.send_input.send(("data", client.send(Request(host="example", target="/"))))
        await recorder.wait_for(lambda: recorder.open_now == 1)
        assert core.state is WorkerState.SERVING
        assert isinstance(_client_events(client, driver)[0], AcceptConnection)
        await driver.send_input.send(("data", client.send(Message(data="hello"))))  # the async handle echoes
        await recorder.wait_for(lambda: len(recorder.messages) == 1)
        with anyio.fail_after(5):
            while not driver.written:
                await anyio.lowlevel.checkpoint()
        assert [event.data for event in _client_events(client, driver) if isinstance(event, TextMessage)] == ["hello"]
        await driver.send_input.send(("data", client.send(CloseConnection(code=1000, reason="bye"))))
    assert core.state is WorkerState.DONE
    assert recorder.closes == [(0, ConnectionClose(1000, "bye"))]  # connection_close exactly once
    assert [type(event) for event in _client_events(client, driver)] == [CloseConnection]
    # The socket's close was asked before the slot went back; the slot went back once.
    assert len(released) == 1 and released[0].index("close_socket") < released[0].index("closed")


async def test_timers_are_deadlines_the_driver_is_asked_to_wake_at() -> None:
    recorder = Recorder()
    released: list[list[Any]] = []
    core, driver = _core(recorder, released, ping_interval=20, ping_timeout=5)
    now = [1000.0]
    core._clock = lambda: now[0]
    client = WSConnection(ConnectionType.CLIENT)
    async with anyio.create_task_group() as tg:
        tg.start_soon(core.run)
        await driver.send_input.send(("data", client.send(Request(host="example", target="/"))))
        await recorder.wait_for(lambda: recorder.open_now == 1)
        _client_events(client, driver)
        # The handshake's timeout asked for a wake-up at 1010; the keepalive (1020) is later, so the
        # core asks nothing more until that wake-up finds nothing due and asks for the next deadline.
        assert driver.asked == [("wake_at", 1010.0)]
        now[0] = 1010.0
        await driver.send_input.send(("timers", None))
        with anyio.fail_after(5):
            while ("wake_at", 1020.0) not in driver.asked:
                await anyio.lowlevel.checkpoint()
        assert driver.written == b""
        now[0] = 1020.0
        await driver.send_input.send(("timers", None))
        with anyio.fail_after(5):
            while not driver.written:
                await anyio.lowlevel.checkpoint()
        assert [type(event) for event in _client_events(client, driver)] == [Ping]
        assert ("wake_at", 1025.0) in driver.asked  # the pong's deadline
        await driver.send_input.send(("lost", None))
    assert recorder.closes == [(0, ConnectionClose(1006, "connection lost"))]
    assert "cancel_timer" in driver.asked
    assert len(released) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_asyncio_private_transport_factory_is_still_there() -> None:
    """The driver makes transports with ``loop._make_socket_transport`` (measured faster than the public path).

    If a Python release drops it, the driver falls back to ``connect_accepted_socket``
    and this test fails, so that the loss is seen and measured again.
    """
    loop = asyncio.get_running_loop()
    assert isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
    assert callable(getattr(loop, "_make_socket_transport", None)), "asyncio dropped _make_socket_transport"
    left, right = socket.socketpair()
    left.setblocking(False)
    protocol = asyncio.Protocol()
    transport = make_socket_transport(loop, left, protocol)
    try:
        assert isinstance(transport, asyncio.Transport)
    finally:
        assert transport is not None
        transport.abort()
        right.close()
        await asyncio.sleep(0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("private_factory", [True, False])
async def test_without_the_drivers_own_transport_asyncios_serves(
    monkeypatch: pytest.MonkeyPatch, private_factory: bool
) -> None:
    """Where `SocketTransport` cannot be made, asyncio's transport serves: made with the private
    factory, or without it through ``connect_accepted_socket``."""
    import pywsserver._asyncio_driver as driver_module
    from pywsserver import start_link

    from .wstools import RawClient

    # As on a loop without a selector (`SocketTransport.selector_of`).
    monkeypatch.setattr(driver_module._loop_shared(asyncio.get_running_loop()), "selector", None)
    asked: list[socket.socket] = []

    def factory(loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any) -> Any:
        asked.append(sock)
        return make_socket_transport(loop, sock, protocol) if private_factory else None

    monkeypatch.setattr(driver_module, "make_socket_transport", factory)
    recorder = Recorder()
    async with start_link(server_options(recorder)) as server:
        client = await RawClient.connect(server.port)
        await recorder.wait_for(lambda: recorder.open_now == 1)
        driver = server.workers()[0]._driver
        assert isinstance(driver, ProtocolDriver)
        assert len(asked) == 1  # asked; without the private factory connect_accepted_socket made the transport
        assert type(driver._transport).__name__ == "_SelectorSocketTransport"
        await client.send(Message(data="reply:public"))
        assert getattr(await client.next_event(), "data", None) == "public"
        await client.aclose()
        await recorder.wait_for(lambda: recorder.open_now == 0)
