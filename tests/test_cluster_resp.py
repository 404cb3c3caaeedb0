"""The cluster node's own reader of what Redis sends (RESP2 and RESP3), fed however the bytes are split.

The end-to-end tests (tests/test_cluster.py) read a real Redis through it; these hold the parser to
every way a read can cut a message, and to what is not RESP.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pywsserver.cluster import _wire
from pywsserver.cluster._resp import RespError, RespReader, parse, take_over


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def message(channel: bytes, data: bytes, push: bool) -> bytes:
    return (b">3\r\n" if push else b"*3\r\n") + bulk(b"message") + bulk(channel) + bulk(data)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.values: list[Any] = []
        self.lost: list[tuple[str, Exception | None]] = []

    def reader(self) -> RespReader:
        return RespReader(
            lambda reason, error: self.lost.append((reason, error)),
            on_value=self.values.append,
            on_message=lambda channel, data: self.messages.append((channel, data)),
        )


#: What a subscription gets: confirmations, messages with CR LF and RESP in their data, under both protocols.
STREAM = b"".join(
    [
        b">3\r\n" + bulk(b"subscribe") + bulk(b"p:broadcast") + b":1\r\n",
        message(b"p:broadcast", b"B\x01\x00\x00\x00\x01a" + b"x" * 70, push=True),
        message(b"p:node:a", b"line\r\nand $3\r\n*2\r\n", push=True),
        message(b"p:broadcast", b"", push=False),
        b"*3\r\n" + bulk(b"subscribe") + bulk(b"p:node:a") + b":2\r\n",
        message(b"p:broadcast", bytes(range(256)) * 40, push=False),
        b"+PONG\r\n",
    ]
)
MESSAGES = [
    (b"p:broadcast", b"B\x01\x00\x00\x00\x01a" + b"x" * 70),
    (b"p:node:a", b"line\r\nand $3\r\n*2\r\n"),
    (b"p:broadcast", b""),
    (b"p:broadcast", bytes(range(256)) * 40),
]
OTHERS = [[b"subscribe", b"p:broadcast", 1], [b"subscribe", b"p:node:a", 2], b"PONG"]


def test_every_message_once_in_order_however_the_reads_cut_the_stream() -> None:
    for cut in [1, 2, 3, 5, 7, 16, 100, 4096, len(STREAM)]:
        recorder = Recorder()
        reader = recorder.reader()
        for start in range(0, len(STREAM), cut):
            reader.data_received(STREAM[start : start + cut])
        assert recorder.messages == MESSAGES, cut
        assert recorder.values == OTHERS, cut
        assert recorder.lost == []


def test_a_large_message_in_many_reads_is_parsed_once_when_all_of_it_is_there() -> None:
    # Joining and parsing again on every read would make one message of n reads cost n^2 copies.
    big = bytes(range(256)) * 4096  # 1 MiB
    stream = message(b"p:broadcast", big, push=True) + b":7\r\n"
    recorder = Recorder()
    reader = recorder.reader()
    parses = 0
    read = reader._read

    def counted(data: bytes) -> int:
        nonlocal parses
        parses += 1
        return read(data)

    reader._read = counted  # type: ignore[method-assign]
    for start in range(0, len(stream), 65536):
        reader.data_received(stream[start : start + 65536])
    assert recorder.messages == [(b"p:broadcast", big)]
    assert recorder.values == [7]
    assert parses == 2  # the first read (the head: the size is known from it), then the whole message


def test_replies_integers_errors_and_the_resp3_types() -> None:
    replies = b":0\r\n:12\r\n-ERR nope\r\n_\r\n$-1\r\n%1\r\n+k\r\n:1\r\n|1\r\n+a\r\n+b\r\n:7\r\n#t\r\n,1.5\r\n"
    for cut in [1, 3, len(replies)]:
        recorder = Recorder()
        reader = recorder.reader()
        for start in range(0, len(replies), cut):
            reader.data_received(replies[start : start + cut])
        assert recorder.values == [0, 12, RespError(b"ERR nope"), None, None, [b"k", 1], 7, b"t", b"1.5"]
        assert isinstance(recorder.values[2], RespError)
    assert parse(b":1\r", 0) is None
    assert parse(b"$5\r\nabc", 0) is None


def test_what_is_not_resp_loses_the_connection_with_the_reason() -> None:
    recorder = Recorder()
    reader = recorder.reader()
    reader.data_received(b":1\r\n?what\r\n:2\r\n")
    assert recorder.values == [1]
    assert len(recorder.lost) == 1 and "unreadable data from Redis" in recorder.lost[0][0]
    assert isinstance(recorder.lost[0][1], ValueError)
    reader.connection_lost(None)
    assert len(recorder.lost) == 1  # told once


def test_a_crash_of_what_a_message_leads_to_is_reported_as_such() -> None:
    lost: list[tuple[str, Exception | None]] = []

    def deliver(channel: bytes, data: bytes) -> None:
        raise KeyError("a bug")

    reader = RespReader(lambda reason, error: lost.append((reason, error)), on_message=deliver)
    reader.data_received(message(b"c", b"d", push=True))
    assert len(lost) == 1 and isinstance(lost[0][1], KeyError)


def test_a_stopped_reader_hands_nothing_over() -> None:
    recorder = Recorder()
    reader = recorder.reader()
    reader.data_received(message(b"c", b"one", push=True))
    reader.stop()
    reader.data_received(message(b"c", b"two", push=True) + b":1\r\n")
    reader.connection_lost(None)
    assert recorder.messages == [(b"c", b"one")] and recorder.values == [] and recorder.lost == []


def test_a_connection_without_asyncio_streams_is_a_clear_error() -> None:
    class Bare:
        pass

    with pytest.raises(RuntimeError, match=r"^cluster: this redis-py keeps no asyncio streams"):
        take_over(Bare(), Recorder().reader())


def test_take_over_hands_on_what_redis_py_read_and_closing_through_redis_py_completes() -> None:
    async def main() -> None:
        taken_over = asyncio.Event()
        served: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await taken_over.wait()
            writer.write(b":2\r\n")
            await writer.drain()
            served.set_result(await reader.read())
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        class Connection:  # what take_over needs of a redis-py connection
            pass

        connection = Connection()
        stream, writer = await asyncio.open_connection("127.0.0.1", port)
        connection._reader, connection._writer = stream, writer  # type: ignore[attr-defined]
        stream.feed_data(b":1\r\n")  # read by redis-py's stream, not parsed yet
        values: list[Any] = []
        second = asyncio.Event()

        def on_value(value: Any) -> None:
            values.append(value)
            if len(values) == 2:
                second.set()

        lost: list[str] = []
        reader = RespReader(lambda reason, error: lost.append(reason), on_value=on_value)
        async with asyncio.timeout(10):
            transport = take_over(connection, reader)
            assert values == [1]
            taken_over.set()
            await second.wait()
            assert values == [1, 2]
            transport.write(b"bye")
            writer.close()
            await writer.wait_closed()  # completes: the replaced protocol is told of the loss
            assert await served == b"bye"
        assert len(lost) == 1
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_broadcast_decodes_where_it_lies_and_malformed_ones_are_wire_errors() -> None:
    encoded = _wire.encode(b"B", _wire.TEXT, [b"node-1", "grüppe".encode(), b"1013"], b"payload")
    assert _wire.decode_broadcast(encoded) == (_wire.TEXT, "grüppe".encode(), 1013, b"payload")
    for cut in range(2, len(encoded) - len(b"payload")):
        with pytest.raises(_wire.WireError):
            _wire.decode_broadcast(encoded[:cut])


def test_a_broadcast_publish_is_the_wire_message_in_one_redis_command() -> None:
    from pywsserver.cluster._node import ClusterNode
    from pywsserver.cluster._options import parse_cluster

    node = ClusterNode(parse_cluster([("url", "redis://127.0.0.1:1/0"), ("node", "web-1"), ("prefix", "p")]))
    written: list[bytes] = []
    node._write = lambda command, reply: written.append(command) or True  # type: ignore[method-assign]
    cases = [("grüppe", "text ✓", "drop", 1013), ("g", b"\r\nbytes\x00", "close", 4000), ("", "", "drop", 1000)]
    for group, data, slow, code in cases:
        written.clear()
        assert node.publish_broadcast(group, data, slow, code) is True
        parsed = parse(written[0], 0)
        assert parsed is not None and parsed[1] == len(written[0])
        flags = (_wire.TEXT if isinstance(data, str) else 0) | (_wire.CLOSE if slow == "close" else 0)
        payload = data.encode() if isinstance(data, str) else data
        expected = _wire.encode(b"B", flags, [b"web-1", group.encode(), b"%d" % code], payload)
        assert parsed[0] == [b"PUBLISH", b"p:broadcast", expected]
        assert _wire.decode_broadcast(expected) == (flags, group.encode(), code, payload)
