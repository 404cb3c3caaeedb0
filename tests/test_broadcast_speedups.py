"""The C speedups of broadcast delivery held equal to their pure-Python twins (hypothesis).

``deliver_frames`` gathers a broadcast's frame on every core that can take it now
(`ConnectionCore._broadcast_now`) and hands the other members back untouched; ``flush_frames``
sends each core's gathered frames with one ``send`` at the end of the turn and hands back what
the Python path must finish. Both run here on real connection cores (their slots as the server
keeps them), over real socket pairs, against ``deliver_frames_python`` and
``flush_frames_python``: the same members delivered and handed back, the same counters, gathered
output, loop list and ``flush_soon`` calls, the same bytes on every socket.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import sys
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywsserver import _asyncio_driver, _broadcast
from pywsserver._core import ConnectionCore
from pywsserver._trio_driver import TrioDriver

try:
    from pywsserver._speedups import deliver_frames
    from pywsserver._speedups import flush_frames as flush_frames_c
except ImportError:  # pragma: no cover - depends on the installation
    deliver_frames = flush_frames_c = None


def flush_frames(cores: list[ConnectionCore]) -> list[tuple[ConnectionCore, bytes | None]]:
    """The C ``flush_frames``, what it hands back returned."""
    left: list[tuple[ConnectionCore, bytes | None]] = []
    flush_frames_c(cores, left)
    return left

needs_c = pytest.mark.skipif(deliver_frames is None, reason="the C speedup was not built (no compiler at install)")

FRAME = b"\x81\x05hello"


@pytest.fixture(params=["c", "python"])
def broadcast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test that uses it runs with the C speedups, then with their pure-Python twins."""
    if request.param == "python":
        monkeypatch.setattr(_broadcast, "deliver_frames", _broadcast.deliver_frames_python)
        monkeypatch.setattr(_asyncio_driver, "flush_frames", _asyncio_driver.flush_frames_python)
    elif deliver_frames is None:
        pytest.skip("the C speedup was not built")
    return str(request.param)


class _RawModule:
    """A protocol module's ``raw_frames`` flag, in a slot as the WebSocket module keeps it."""

    __slots__ = ("raw_frames",)

    def __init__(self, raw_frames: bool) -> None:
        self.raw_frames = raw_frames


class _DictModule:
    """The same flag in an instance dict: the C leaves such a member to the Python path."""

    def __init__(self, raw_frames: bool) -> None:
        self.raw_frames = raw_frames


class _Driver:
    """The core's driver: records ``flush_soon`` calls in a log shared by every driver of the run."""

    __slots__ = ("_fd", "_plain", "log", "name")

    def __init__(self, name: int, log: list[Any], plain: Any = None, fd: int = -1) -> None:
        self.name, self.log, self._plain, self._fd = name, log, plain, fd

    def flush_soon(self) -> None:
        self.log.append(("flush_soon", self.name))


class _Transport:
    """What the flush reads of asyncio's selector socket transport (attributes in its instance dict)."""

    def __init__(self, sock: socket.socket, buffered: bool, lost: bool, deque: bool = False) -> None:
        self._sock = sock
        # A bytearray up to Python 3.11, a deque of chunks from 3.12 on.
        self._buffer: bytearray | collections.deque[bytes] = bytearray(b"x" if buffered else b"")
        if deque:
            self._buffer = collections.deque([b"x"] if buffered else [])
        self._conn_lost = 1 if lost else 0
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


def _core(**slots: Any) -> ConnectionCore:
    """A connection core with only the slots the broadcast path reads (no driver task, no loop)."""
    core: ConnectionCore = ConnectionCore.__new__(ConnectionCore)
    defaults = {
        "_raw_module": None,
        "_socket_closed": False,
        "_stopped": False,
        "_can_write": True,
        "_mailbox_send": None,
        "_out": [],
        "_messages_out": 0,
        "_bytes_out": 0,
        "_flushes": None,
        "_frames_log": None,
    }
    for name, value in {**defaults, **slots}.items():
        setattr(core, name, value)
    return core


# ------------------------------------------------------------------ deliver_frames

member_setups = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["core", "core", "core", "other"]),
        "module": st.sampled_from(["raw", "raw", "raw", "encodes", "none", "dict"]),
        "closed": st.booleans(),
        "stopped": st.booleans(),
        "can_write": st.sampled_from([True, True, False]),
        "mailbox": st.sampled_from(["none", "none", "empty", "waiting"]),
        "out": st.lists(st.binary(max_size=3), max_size=2),
        "messages_out": st.sampled_from([0, 5, 2**40, 2**63 - 1, 2**64]),  # past a C long: the general add
        "shared": st.sampled_from([True, True, False]),
    }
)


def _members(setups: list[dict[str, Any]], flushes_before: int, log: list[Any]) -> tuple[list[Any], ...]:
    """Members as ``setups`` say, the loop's list (holding ``flushes_before`` others), the streams to close."""
    flushes: list[Any] = [_core() for _ in range(flushes_before)]
    members: list[Any] = []
    streams: list[Any] = []
    for index, setup in enumerate(setups):
        if setup["kind"] == "other":
            members.append(("server", index))  # a gen server's reference, for the Python path
            continue
        module = {
            "raw": _RawModule(True),
            "encodes": _RawModule(False),
            "none": None,
            "dict": _DictModule(True),
        }[setup["module"]]
        mailbox = None
        if setup["mailbox"] != "none":
            mailbox, receive = anyio.create_memory_object_stream[Any](10)
            streams += [mailbox, receive]
            if setup["mailbox"] == "waiting":
                mailbox.send_nowait("waiting action")
        members.append(
            _core(
                _raw_module=module,
                _socket_closed=setup["closed"],
                _stopped=setup["stopped"],
                _can_write=setup["can_write"],
                _mailbox_send=mailbox,
                _out=list(setup["out"]),
                _messages_out=setup["messages_out"],
                _flushes=flushes if setup["shared"] else None,
                _driver=_Driver(index, log),
            )
        )
    return members, flushes, streams


def _delivered(deliver: Any, setups: list[dict[str, Any]], flushes_before: int, general: bool) -> Any:
    """What ``deliver`` did, then (``general``) what `_deliver`'s loop does with the members it handed back."""
    log: list[Any] = []
    members, flushes, streams = _members(setups, flushes_before, log)
    try:
        count, rest = deliver(members, FRAME, ConnectionCore)
        rest_indexes = [members.index(member) for member in rest]
        if general:  # as `_broadcast._deliver`: each core handed back is asked again
            for member in rest:
                if isinstance(member, ConnectionCore) and member._broadcast_now(FRAME):
                    count += 1
                    rest_indexes.remove(members.index(member))
        cores = [member for member in members if isinstance(member, ConnectionCore)]
        flushed = [members.index(core) if core in members else "before" for core in flushes]
        if general:
            # The members the general loop asks join the loop's list after the fast path's, and
            # the turn's one callback may come from another member's driver (all of them schedule
            # the same flush of the loop): only the order between connections differs.
            flushed.sort(key=str)
            shared = [entry for entry in log if setups[entry[1]]["shared"]]
            log = [len(shared), sorted(entry for entry in log if not setups[entry[1]]["shared"])]
        return (count, rest_indexes, [(core._messages_out, core._out) for core in cores], flushed, log)
    finally:
        for stream in streams:
            stream.close()


@needs_c
@settings(max_examples=400, deadline=None)
@given(setups=st.lists(member_setups, max_size=6), flushes_before=st.integers(0, 2))
def test_deliver_frames_c_and_python_agree_on_every_member(setups: list[dict[str, Any]], flushes_before: int) -> None:
    # What the two hand back may differ only by members the C leaves to the Python path (a
    # mailbox, a module without the flag in a slot); once `_deliver`'s loop has asked those, the
    # effects are the same.
    assert _delivered(deliver_frames, setups, flushes_before, True) == _delivered(
        _broadcast.deliver_frames_python, setups, flushes_before, True
    )
    if all(setup["module"] != "dict" for setup in setups):  # nothing the C declines that Python takes
        assert _delivered(deliver_frames, setups, flushes_before, False) == _delivered(
            _broadcast.deliver_frames_python, setups, flushes_before, False
        )


@pytest.mark.parametrize("deliver", [_broadcast.deliver_frames_python, deliver_frames], ids=["python", "c"])
def test_deliver_frames_gathers_joins_the_loop_once_and_hands_back_the_rest(deliver: Any) -> None:
    if deliver is None:
        pytest.skip("the C speedup was not built")
    log: list[Any] = []
    flushes: list[Any] = []
    fresh = _core(_raw_module=_RawModule(True), _flushes=flushes, _driver=_Driver(0, log))
    second = _core(_raw_module=_RawModule(True), _flushes=flushes, _driver=_Driver(1, log))
    replying = _core(_raw_module=_RawModule(True), _out=[b"reply"], _flushes=flushes, _driver=_Driver(2, log))
    trio = _core(_raw_module=_RawModule(True), _flushes=None, _driver=_Driver(3, log))
    paused = _core(_raw_module=_RawModule(True), _can_write=False, _flushes=flushes, _driver=_Driver(4, log))
    encodes = _core(_raw_module=_RawModule(False), _flushes=flushes, _driver=_Driver(5, log))
    members = [fresh, "not a core", second, replying, trio, paused, encodes]
    count, rest = deliver(members, FRAME, ConnectionCore)
    assert count == 4 and rest == ["not a core", paused, encodes]
    assert flushes == [fresh, second]  # the reply's core writes its frame with the reply
    assert log == [("flush_soon", 0), ("flush_soon", 3)]  # the turn's first, and trio's own
    assert replying._out == [b"reply", FRAME] and trio._out == [FRAME] and paused._out == []
    assert [core._messages_out for core in members if isinstance(core, ConnectionCore)] == [1, 1, 1, 1, 0, 0]


# ------------------------------------------------------------------ flush_frames

core_setups = st.fixed_dictionaries(
    {
        "out": st.lists(st.binary(min_size=1, max_size=4), max_size=3),
        "closed": st.booleans(),
        "logged": st.sampled_from([False, False, False, True]),
        "writer": st.sampled_from(["plain", "plain", "plain", "other"]),
        "buffered": st.sampled_from([False, False, True]),
        "deque": st.booleans(),  # the transport's buffer as Python 3.12 keeps it
        "lost": st.sampled_from([False, False, True]),
        "socket": st.sampled_from(["open", "open", "full", "broken"]),
        "bytes_out": st.sampled_from([0, 7, 2**40, 2**63 - 2, 2**64]),  # past a C long: the general add
    }
)


def _flushed(flush: Any, setups: list[dict[str, Any]]) -> Any:
    """What ``flush`` did to cores made as ``setups`` say, each over one end of a socket pair."""
    with contextlib.ExitStack() as stack:
        cores: list[ConnectionCore] = []
        peers: list[socket.socket | None] = []
        for setup in setups:
            ours, peer = socket.socketpair()
            stack.enter_context(ours)
            stack.enter_context(peer)
            ours.setblocking(False)
            peer.setblocking(False)
            if setup["socket"] == "full":  # a send takes nothing, or part
                with contextlib.suppress(BlockingIOError):
                    for _ in range(10_000):
                        ours.send(b"f" * 4096)
            elif setup["socket"] == "broken":  # the send fails
                peer.close()
            transport = _Transport(ours, setup["buffered"], setup["lost"], setup.get("deque", False))
            plain = transport if setup["writer"] == "plain" else _Transport(ours, False, False)
            cores.append(
                _core(
                    _out=list(setup["out"]),
                    _socket_closed=setup["closed"],
                    _frames_log=object() if setup["logged"] else None,
                    _writer=transport,
                    _driver=_Driver(len(cores), [], plain, ours.fileno()),
                    _bytes_out=setup["bytes_out"],
                )
            )
            peers.append(peer if setup["socket"] == "open" else None)
        handed: list[tuple[ConnectionCore, bytes | None]] = []
        flush(cores, handed)
        left = [(cores.index(core), rest) for core, rest in handed]
        received = []
        for peer in peers:
            data = b""
            if peer is not None:
                with contextlib.suppress(BlockingIOError):
                    while chunk := peer.recv(65536):
                        data += chunk
            received.append(data)
        return left, received, [(core._out, core._bytes_out, core._writer.written) for core in cores]  # type: ignore[attr-defined]


@needs_c
@settings(max_examples=400, deadline=None)
@given(setups=st.lists(core_setups, max_size=5))
def test_flush_frames_c_and_python_agree_on_what_is_sent_counted_and_handed_back(setups: list[dict[str, Any]]) -> None:
    assert _flushed(flush_frames_c, setups) == _flushed(_asyncio_driver.flush_frames_python, setups)


@pytest.mark.parametrize("flush", [_asyncio_driver.flush_frames_python, flush_frames_c], ids=["python", "c"])
def test_flush_frames_sends_once_per_core_and_hands_back_the_unusual(flush: Any) -> None:
    if flush is None:
        pytest.skip("the C speedup was not built")
    plain = {"closed": False, "logged": False, "writer": "plain", "buffered": False, "lost": False, "bytes_out": 7}
    left, received, cores = _flushed(
        flush,
        [
            {**plain, "out": [b"ab", b"c"], "socket": "open"},  # joined, one send
            {**plain, "out": [], "socket": "open"},  # nothing gathered: nothing happens
            {**plain, "out": [b"x"], "socket": "open", "buffered": True},  # behind buffered bytes: general path
            {**plain, "out": [b"y"], "socket": "broken"},  # the send fails: the transport's write is handed it
        ],
    )
    assert left == [(2, None), (3, b"y")]
    assert received[0] == b"abc" and received[1] == b""
    assert cores[0] == ([], 10, []) and cores[2] == ([b"x"], 7, []) and cores[3] == ([], 8, [])


@needs_c
def test_flush_frames_leaves_a_transport_with_a_data_descriptor_to_the_general_path() -> None:
    # A class whose ``_buffer`` is a property: getattr would call it, so the C must not read the
    # instance dict; the core goes to the general path untouched.
    class Odd(_Transport):
        @property
        def _buffer(self) -> bytearray:  # type: ignore[override]
            return bytearray()

        @_buffer.setter
        def _buffer(self, value: bytearray) -> None:
            pass

    ours, peer = socket.socketpair()
    with ours, peer:
        transport = Odd(ours, False, False)
        core = _core(_out=[b"z"], _writer=transport, _driver=_Driver(0, [], transport, ours.fileno()))
        assert flush_frames([core]) == [(core, None)] and core._out == [b"z"]


@needs_c
def test_flush_frames_leaves_output_that_is_not_exact_bytes_to_the_general_path() -> None:
    class Frame(bytes):
        pass

    ours, peer = socket.socketpair()
    with ours, peer:
        for out in ([bytearray(b"z")], [b"a", Frame(b"b")]):
            transport = _Transport(ours, False, False)
            core = _core(_out=list(out), _writer=transport, _driver=_Driver(0, [], transport, ours.fileno()))
            assert flush_frames([core]) == [(core, None)] and core._out == out and core._bytes_out == 0


@needs_c
def test_flush_frames_keeps_only_a_small_output_array_and_every_reference_count() -> None:
    # One frame: the list's array (4 items) is kept for the next append; a burst's longer array
    # is released, as list.clear would; no reference is gained or lost on the frames.
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        transport = _Transport(ours, False, False)
        core = _core(_raw_module=_RawModule(True), _writer=transport, _driver=_Driver(0, [], transport, ours.fileno()))
        frame, burst = b"\x81\x02" + b"ab"[:2], [b"\x81\x01" + bytes([n]) for n in range(10)]
        before = sys.getrefcount(frame), [sys.getrefcount(part) for part in burst]
        for _ in range(3):
            assert deliver_frames([core], frame, ConnectionCore) == (1, [])
            assert flush_frames([core]) == [] and core._out == []
            assert sys.getsizeof(core._out) == sys.getsizeof([None] * 4)  # the array of 4 kept
            assert [deliver_frames([core], part, ConnectionCore) for part in burst] == [(1, [])] * 10
            assert flush_frames([core]) == [] and core._out == []
            assert sys.getsizeof(core._out) == sys.getsizeof([])  # released
        assert (sys.getrefcount(frame), [sys.getrefcount(part) for part in burst]) == before
        assert core._messages_out == 33 and core._bytes_out == 3 * (4 + 30)
        assert peer.recv(65536) == (frame + b"".join(burst)) * 3


# ------------------------------------------------------------------ trio: a lone frame sent at once


class _LoggedTrioDriver(TrioDriver):
    """The trio driver, its ``_keep`` and ``_failed`` recorded (what they do needs a running task)."""

    __slots__ = ("log",)

    def _keep(self, data: bytes, sent: int) -> None:
        self.log.append(("keep", bytes(data), sent))

    def _failed(self) -> None:
        self.log.append(("failed",))


class _FramesLog:
    """A frame log (the general path writes through the core's ``_flush``, which logs)."""

    def debug(self, *args: Any) -> None:
        pass


trio_setups = st.fixed_dictionaries(
    {
        "out": st.sampled_from([[], [], [b"reply"]]),
        "pending": st.booleans(),
        "lost": st.sampled_from([False, False, True]),
        "logged": st.sampled_from([False, False, True]),
        "socket": st.sampled_from(["open", "open", "full", "broken"]),
        "bytes_out": st.sampled_from([0, 7, 2**63 - 2]),
    }
)


def _trio_delivered(deliver: Any, setups: list[dict[str, Any]], frame: bytes) -> Any:
    """What ``deliver`` did to trio cores made as ``setups`` say, each over one end of a socket pair."""
    with contextlib.ExitStack() as stack:
        cores: list[ConnectionCore] = []
        peers: list[socket.socket | None] = []
        for setup in setups:
            ours, peer = socket.socketpair()
            stack.enter_context(ours)
            stack.enter_context(peer)
            ours.setblocking(False)
            peer.setblocking(False)
            if setup["socket"] == "full":
                with contextlib.suppress(BlockingIOError):
                    for _ in range(10_000):
                        ours.send(b"f" * 4096)
            elif setup["socket"] == "broken":
                peer.close()
            core = _core(
                _raw_module=_RawModule(True),
                _out=list(setup["out"]),
                _frames_log=_FramesLog() if setup["logged"] else None,
                _bytes_out=setup["bytes_out"],
            )
            driver = _LoggedTrioDriver(core, ours)
            driver.log = []
            core._driver = driver
            if setup["pending"]:
                driver._pending.append(b"earlier")
            driver._lost = setup["lost"]
            cores.append(core)
            peers.append(peer if setup["socket"] == "open" else None)
        count, rest = deliver(cores, frame, ConnectionCore)
        received = []
        for peer in peers:
            data = b""
            if peer is not None:
                with contextlib.suppress(BlockingIOError):
                    while chunk := peer.recv(65536):
                        data += chunk
            received.append(data)
        drivers: list[Any] = [core._driver for core in cores]
        return (
            count,
            rest,
            received,
            [(core._out, core._messages_out, core._bytes_out) for core in cores],
            [(driver.log, driver._pending) for driver in drivers],
        )


@needs_c
@settings(max_examples=300, deadline=None)
@given(setups=st.lists(trio_setups, max_size=4), size=st.sampled_from([5, 300_000]))
def test_deliver_frames_c_and_python_agree_on_trio_drivers(setups: list[dict[str, Any]], size: int) -> None:
    # The C sends a lone frame itself where the driver's flush_soon would (nothing pending, not
    # lost, no frame log), and hands a short or failed send to _keep or _failed as it does; a
    # frame larger than the socket takes at once makes the send short.
    frame = b"\x82" + bytes(size)
    assert _trio_delivered(deliver_frames, setups, frame) == _trio_delivered(
        _broadcast.deliver_frames_python, setups, frame
    )


@needs_c
def test_flush_frames_takes_the_shortcut_with_python_3_12s_buffer_too() -> None:
    # From Python 3.12 the transport's ``_buffer`` is a deque: empty, the frames go straight to
    # the socket, as with 3.11's empty bytearray; not empty, to the general path.
    for buffered, sent in ((False, True), (True, False)):
        ours, peer = socket.socketpair()
        with ours, peer:
            ours.setblocking(False)
            peer.setblocking(False)
            transport = _Transport(ours, buffered, False, deque=True)
            core = _core(_out=[b"z"], _writer=transport, _driver=_Driver(0, [], transport, ours.fileno()))
            left = flush_frames([core])
            if sent:
                assert left == [] and peer.recv(10) == b"z"
            else:
                assert left == [(core, None)] and core._out == [b"z"]


@needs_c
def test_a_send_to_a_peer_gone_never_raises_sigpipe_even_with_its_default_action() -> None:
    # A program embedding the server may give SIGPIPE its default action back (Python ignores
    # it): the C sends pass MSG_NOSIGNAL, so a peer gone is an error to report, not a kill.
    import signal
    import subprocess

    if not hasattr(signal, "SIGPIPE"):
        pytest.skip("no SIGPIPE on this system")
    script = (
        "import signal, socket\n"
        "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
        "from tests.test_broadcast_speedups import _core, _Driver, _Transport\n"
        "from tests.test_broadcast_speedups import flush_frames\n"
        "ours, peer = socket.socketpair()\n"
        "peer.close()\n"
        "transport = _Transport(ours, False, False)\n"
        "core = _core(_out=[b'z'], _writer=transport, _driver=_Driver(0, [], transport, ours.fileno()))\n"
        "assert flush_frames([core]) == [(core, b'z')]\n"
        "print('alive')\n"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "alive"), done.stderr


class _Unaddable:
    """A ``_bytes_out`` that cannot be added to: the one failure the flush meets before a send."""

    def __add__(self, other: object) -> Any:
        raise ArithmeticError("cannot count")

    __radd__ = __add__


@pytest.mark.parametrize("flush", [_asyncio_driver.flush_frames_python, flush_frames_c], ids=["python", "c"])
def test_a_flush_that_fails_midway_loses_no_frame(flush: Any) -> None:
    # The first core's send is short: its rest is handed back. The second cannot count its bytes:
    # the flush fails before its send, and its frames go back to its ``_out``. The rest handed
    # back before the failure stays in the caller's list, for the transport's write.
    if flush is None:
        pytest.skip("the C speedup was not built")
    with contextlib.ExitStack() as stack:
        cores = []
        for bytes_out in (0, _Unaddable()):
            ours, peer = socket.socketpair()
            stack.enter_context(ours)
            stack.enter_context(peer)
            ours.setblocking(False)
            transport = _Transport(ours, False, False)
            cores.append(
                _core(
                    _out=[b"a" * 4_000_000],  # more than a socket pair's buffers take at once
                    _writer=transport,
                    _driver=_Driver(len(cores), [], transport, ours.fileno()),
                    _bytes_out=bytes_out,
                )
            )
        left: list[tuple[ConnectionCore, bytes | None]] = []
        with pytest.raises(ArithmeticError):
            flush(cores, left)
        assert len(left) == 1 and left[0][0] is cores[0]
        rest = left[0][1]
        assert rest is not None and 0 < len(rest) < 4_000_000 and cores[0]._out == []
        assert cores[1]._out == [b"a" * 4_000_000]
