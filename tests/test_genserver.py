"""Unit tests of the gen-server-like process: calls, casts, timeouts, mailbox bounds, names."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

from pywsserver.supervision import (
    NO_REPLY,
    Caller,
    CallTimeout,
    GenServer,
    MailboxFull,
    NameAlreadyRegistered,
    NotRunning,
    ServerRef,
    Shutdown,
    Supervisor,
    call,
    cast,
    send_info,
    whereis,
)

pytestmark = pytest.mark.anyio


class Counter(GenServer):
    terminated: ClassVar[list[object]] = []

    def init(self, start: int = 0) -> None:
        self.value = start
        self.infos: list[Any] = []
        self.parked: Caller | None = None
        self.gate = anyio.Event()
        self.busy = anyio.Event()

    async def handle_call(self, request: Any, caller: Caller) -> Any:
        if request == "get":
            return self.value
        if request == "park":  # answer later, from handle_cast("release")
            self.parked = caller
            return NO_REPLY
        if request == "slow":
            self.busy.set()
            await self.gate.wait()
            return "slow done"
        if request == "crash":
            raise RuntimeError("crash in call")
        if request == "stop":
            self.stop()
            return "stopping"
        raise AssertionError(request)

    def handle_cast(self, message: Any) -> None:
        if message == "release":
            assert self.parked is not None
            self.parked.reply(("released", self.value))
        else:
            self.value += message

    def handle_info(self, message: Any) -> None:
        self.infos.append(message)

    async def terminate(self, reason: BaseException | None) -> None:
        await anyio.lowlevel.checkpoint()
        Counter.terminated.append(reason)


async def test_call_cast_and_info_are_handled_in_order() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Counter().run, 10)
        ref.cast(5)
        ref.send("hello")
        assert await ref.call("get") == 15
        assert ref.server.infos == ["hello"]  # type: ignore[attr-defined]
        await ref.stop()
    assert not ref.alive


async def test_deferred_reply_with_no_reply_and_caller_reply() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Counter().run, 3)
        results: list[Any] = []

        async def parked_call() -> None:
            results.append(await ref.call("park"))

        tg.start_soon(parked_call)
        assert await ref.call("get") == 3  # the server serves on while the first call waits
        ref.cast("release")
        await ref.stop()
    assert results == [("released", 3)]


async def test_call_timeout_drops_the_late_reply_and_the_server_serves_on() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Counter().run)
        with pytest.raises(CallTimeout):
            await ref.call("slow", timeout=0.05)
        ref.server.gate.set()  # type: ignore[attr-defined]
        ref.cast(1)
        assert await ref.call("get") == 1
        await ref.stop()


async def test_a_crash_in_a_call_fails_the_caller_with_not_running() -> None:
    with pytest.RaisesGroup(RuntimeError):
        async with anyio.create_task_group() as tg:
            ref: ServerRef = await tg.start(Counter().run)
            with pytest.raises(NotRunning, match="crash in call"):
                await ref.call("crash")
    assert isinstance(Counter.terminated[-1], RuntimeError)


async def test_calls_and_casts_to_a_stopped_server_are_clear_errors() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Counter().run)
        assert await ref.call("stop") == "stopping"
        await ref.wait()
    assert Counter.terminated[-1] is None
    with pytest.raises(NotRunning):
        await ref.call("get")
    with pytest.raises(NotRunning):
        ref.cast(1)


async def test_cast_never_blocks_and_raises_mailbox_full() -> None:
    class Tiny(Counter):
        mailbox_size = 2

    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Tiny().run)
        server: Tiny = ref.server  # type: ignore[assignment]
        tg.start_soon(ref.call, "slow")
        await server.busy.wait()  # the server is inside a call, not reading its mailbox
        ref.cast(1)
        ref.cast(1)
        with pytest.raises(MailboxFull):
            ref.cast(1)
        server.gate.set()
        assert await ref.call("get") == 2
        await ref.stop()


async def test_a_call_waits_for_room_in_the_mailbox_within_its_timeout() -> None:
    class Tiny(Counter):
        mailbox_size = 1

    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(Tiny().run)
        server: Tiny = ref.server  # type: ignore[assignment]
        tg.start_soon(ref.call, "slow")
        await server.busy.wait()
        ref.cast(1)  # fills the mailbox while "slow" is handled
        with pytest.raises(CallTimeout):
            await ref.call("get", timeout=0.05)
        server.gate.set()
        assert await ref.call("get") == 1
        await ref.stop()


async def test_pending_callers_are_failed_when_the_server_is_stopped_by_its_supervisor() -> None:
    outcome: list[BaseException] = []
    sup = Supervisor([Counter.child_spec("counter", name="counter")])
    async with sup.running():

        async def waiter() -> None:
            try:
                await call("counter", "park", timeout=5)
            except NotRunning as error:
                outcome.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await call("counter", "get")  # the park call is now pending
            await sup.terminate_child("counter")
    assert len(outcome) == 1
    assert isinstance(Counter.terminated[-1], Shutdown)


async def test_a_registered_server_is_found_by_name_and_reregistered_after_restart() -> None:
    sup = Supervisor([Counter.child_spec("counter", 7, name="named-counter")], intensity=3)
    async with sup.running():
        first = whereis("named-counter")
        assert isinstance(first, ServerRef)
        cast("named-counter", 1)
        send_info("named-counter", "info")
        assert await call("named-counter", "get") == 8
        with pytest.raises(NotRunning):
            await call("named-counter", "crash")
        await sup.settle()
        second = whereis("named-counter")
        assert second is not first and second.alive
        assert await call("named-counter", "get") == 7
    assert whereis("named-counter") is None
    with pytest.raises(NotRunning):
        await call("named-counter", "get")


async def test_a_taken_name_fails_the_start() -> None:
    async with anyio.create_task_group() as tg:
        ref: ServerRef = await tg.start(lambda task_status: Counter().run(name="taken", task_status=task_status))
        with pytest.raises(NameAlreadyRegistered):
            await tg.start(lambda task_status: Counter().run(name="taken", task_status=task_status))
        await ref.stop()


async def test_an_init_failure_is_a_start_failure() -> None:
    class Broken(GenServer):
        def init(self) -> None:
            raise ValueError("no config")

    async with anyio.create_task_group() as tg:
        with pytest.raises(ValueError, match="no config"):
            await tg.start(Broken().run)
