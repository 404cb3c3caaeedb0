"""The reliability ordeal at scale: a pywsserver server in its own process, attacked from this one.

``python benchmarks/stress.py`` runs every phase with its default counts (about a minute);
``--scale 0.05`` runs a small version (the test suite's smoke test does). Every loop is bounded in
count and in time, and everything targets 127.0.0.1. Phases:

* hold: N connections open at once, each echoing messages in rounds (RSS per connection);
* crash: clients echo while about 10% of messages make the handler raise (1011 for those only);
* resets: connections that send half a frame and vanish with a TCP reset;
* storm: handshakes opened and closed, many in parallel;
* garbage: random bytes instead of HTTP, and after a valid handshake;
* fragments: connections each sending a 1 MiB message as 1-byte fragments (the server refuses it
  after ``max_fragments`` frames) while a normal client echoes: the server's CPU time and RSS growth,
  and the normal client's slowest echo;
* jammed (``--only jammed``): against a server with a small ``max_connections`` and an ``idle_timeout``,
  clients connect, ask for a large reply and never read; after each round the server's descriptors
  and slots must come back to their baseline while those clients still hold their sockets;
* tls (``--only tls``): rounds of TLS connections (certificates made with ``trustme``) that complete
  the WebSocket handshake and are reset by the client; the server's RSS after each round;
* recovery: how long until the server's descriptors are back to their baseline, and whether a
  fresh client is served.

The server's RSS and descriptor count are read from ``/proc`` (Linux). The results go to the terminal
and to ``benchmarks/results/stress-BACKEND.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


# ------------------------------------------------------------------ the server


class StressHandler:
    """Echoes; a text starting with ``boom`` makes it raise (the server closes that connection, 1011)."""

    def init(self, options: dict[str, Any]) -> None:
        return None

    def handle(self, message: object, state: None) -> tuple[Any, ...]:
        if isinstance(message, str) and message.startswith("boom"):
            raise RuntimeError("injected fault")
        if message == "jam":
            return ("reply", b"j" * (1 << 20), state)  # more than the socket buffers take
        if isinstance(message, str | bytes):
            return ("reply", message, state)
        return ("noreply", state)


def serve(backend: str, max_fragments: int | None, extra: argparse.Namespace) -> None:
    import logging

    import anyio

    import pywsserver

    logging.basicConfig(level=logging.CRITICAL)  # injected faults are expected: keep the output clean
    websocket: list[tuple[str, Any]] = [("handler_module", StressHandler)]
    if max_fragments is not None:
        websocket.append(("max_fragments", max_fragments))
    if extra.idle_timeout is not None:
        websocket.append(("idle_timeout", extra.idle_timeout))
    options: list[tuple[str, Any]] = [
        ("port", 0),
        ("max_connections", extra.max_connections),
        ("backlog", 4096),
        (
            "worker_options",
            [("protocol_modules", [("websocket", websocket)])],
        ),
    ]
    if extra.certfile is not None:
        options.append(("tls", [("certfile", extra.certfile)]))

    async def main() -> None:
        async with pywsserver.start_link(options) as server:
            print(f"ready {server.port}", flush=True)
            await anyio.sleep_forever()

    anyio.run(main, backend=backend)


# ------------------------------------------------------------------ the client


def raise_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, 0x80 | size)) + b"\0\0\0\0" + payload  # a zero mask: sent as is
    header = bytes((0x80 | opcode, 0xFE)) + struct.pack("!H", size)
    return header + b"\0\0\0\0" + payload


class Connection:
    """A raw client connection with just enough framing for echo (server frames are small)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError(head[:40])
        return cls(reader, writer)

    async def echo(self, text: str) -> tuple[int, bytes]:
        """Send a text; return ``(opcode, payload)`` of the answer."""
        self.writer.write(frame(1, text.encode()))
        return await self.receive()

    async def receive(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return first & 0x0F, await self.reader.readexactly(size)

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.write(frame(8, struct.pack("!H", 1000)))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self.receive(), 5)
        self.writer.close()


class Server:
    """The server process and what /proc says of it."""

    def __init__(self, backend: str, max_fragments: int | None = None, options: list[str] | None = None) -> None:
        extra = ["--max-fragments", str(max_fragments)] if max_fragments is not None else []
        extra += options or []
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", "--backend", backend, *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if not line or line[0] != "ready":
            self.process.kill()
            raise RuntimeError("the server did not start")
        self.port = int(line[1])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def bounded_gather(jobs: list[Any], parallel: int, deadline: float) -> list[Any]:
    semaphore = asyncio.Semaphore(parallel)

    async def one(job: Any) -> Any:
        async with semaphore:
            return await job()

    return await asyncio.wait_for(asyncio.gather(*(one(job) for job in jobs), return_exceptions=True), deadline)


async def phase_hold(server: Server, count: int, rounds: int) -> dict[str, Any]:
    before = server.rss_kib()
    started = time.monotonic()
    opened = await bounded_gather([lambda: Connection.open(server.port) for _ in range(count)], 200, 120)
    connections = [c for c in opened if isinstance(c, Connection)]
    held_rss = server.rss_kib()
    echoed = 0
    for number in range(rounds):
        answers = await asyncio.wait_for(
            asyncio.gather(*(c.echo(f"round {number}") for c in connections), return_exceptions=True), 120
        )
        echoed += sum(1 for a in answers if a == (1, f"round {number}".encode()))
    seconds = time.monotonic() - started
    for connection in connections:
        connection.writer.close()
    return {
        "connections held": len(connections),
        "echoes": f"{echoed} of {len(connections) * rounds}",
        "server RSS per connection": f"{(held_rss - before) / max(len(connections), 1):.1f} KiB",
        "time": f"{seconds:.1f} s",
    }


async def phase_crash(server: Server, clients: int, messages: int, seed: int) -> dict[str, Any]:
    chooser = random.Random(seed)
    plans = [[chooser.random() < 0.1 for _ in range(messages)] for _ in range(clients)]

    async def client(plan: list[bool]) -> tuple[bool, bool]:
        connection = await Connection.open(server.port)
        for index, crash in enumerate(plan):
            if crash:
                opcode, payload = await connection.echo("boom")
                connection.writer.close()
                return (opcode == 8 and payload[:2] == b"\x03\xf3", True)  # 1011
            if await connection.echo(f"m{index}") != (1, f"m{index}".encode()):
                return (False, False)
        await connection.close()
        return (True, False)

    started = time.monotonic()
    results = await bounded_gather([lambda p=p: client(p) for p in plans], 200, 180)
    correct = sum(1 for r in results if isinstance(r, tuple) and r[0])
    crashes = sum(1 for r in results if isinstance(r, tuple) and r[1])
    total = sum(len(p) if True not in p else p.index(True) + 1 for p in plans)
    return {
        "clients": clients,
        "messages sent": total,
        "handler crashes": crashes,
        "crash rate": f"{crashes / max(total, 1):.1%} of messages",
        "clients that saw exactly what they should": f"{correct} of {clients}",
        "time": f"{time.monotonic() - started:.1f} s",
    }


async def phase_resets(server: Server, count: int) -> dict[str, Any]:
    async def vanish() -> None:
        connection = await Connection.open(server.port)
        connection.writer.write(frame(1, b"x" * 1000)[:500])
        await connection.writer.drain()
        connection.reset()

    started = time.monotonic()
    results = await bounded_gather([vanish for _ in range(count)], 200, 120)
    return {
        "resets mid-message": sum(1 for r in results if r is None),
        "time": f"{time.monotonic() - started:.1f} s",
    }


async def phase_storm(server: Server, count: int) -> dict[str, Any]:
    async def handshake() -> None:
        connection = await Connection.open(server.port)
        connection.writer.close()

    started = time.monotonic()
    results = await bounded_gather([handshake for _ in range(count)], 200, 120)
    seconds = time.monotonic() - started
    done = sum(1 for r in results if r is None)
    return {"handshakes": done, "rate": f"{done / seconds:.0f}/s", "time": f"{seconds:.1f} s"}


async def phase_garbage(server: Server, count: int, seed: int) -> dict[str, Any]:
    chooser = random.Random(seed)

    async def garbage(after_handshake: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        if after_handshake:
            writer.write(UPGRADE)
        writer.write(bytes(chooser.randrange(256) for _ in range(chooser.randrange(2, 2000))) + b"\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.read(65536), 15)
        finally:
            writer.close()

    started = time.monotonic()
    results = await bounded_gather([lambda i=i: garbage(i % 2 == 1) for i in range(count)], 100, 120)
    answered = sum(1 for r in results if isinstance(r, bytes) and r)
    return {"garbage connections": count, "answered or closed": answered, "time": f"{time.monotonic() - started:.1f} s"}


async def phase_fragments(server: Server, attackers: int, size: int) -> dict[str, Any]:
    """``attackers`` connections each send one ``size``-byte binary message as 1-byte fragments."""
    first = bytes((0x02, 0x81)) + b"\0\0\0\0" + b"x"  # FIN=0, binary, 1 byte, a zero mask
    middle = bytes((0x00, 0x81)) + b"\0\0\0\0" + b"x"  # FIN=0, continuation
    last = bytes((0x80, 0x81)) + b"\0\0\0\0" + b"x"  # FIN=1, continuation
    chunk_frames = 8192
    chunk = middle * chunk_frames

    async def attack() -> str:
        connection = await Connection.open(server.port)
        writer = connection.writer
        try:
            writer.write(first)
            sent = 1
            while sent < size - 1:
                count = min(chunk_frames, size - 1 - sent)
                writer.write(chunk if count == chunk_frames else middle * count)
                sent += count
                await writer.drain()
            writer.write(last)
            await writer.drain()
            opcode, payload = await asyncio.wait_for(connection.receive(), 120)
            for _ in range(10):  # keepalive pings may come first
                if opcode != 9:
                    break
                opcode, payload = await asyncio.wait_for(connection.receive(), 120)
            return f"echoed {len(payload)} bytes" if opcode == 2 else f"closed {int.from_bytes(payload[:2], 'big')}"
        except (ConnectionError, asyncio.IncompleteReadError):
            # Refused: the close frame may be waiting behind the reset of our unread writes.
            with contextlib.suppress(Exception):
                opcode, payload = await asyncio.wait_for(connection.receive(), 5)
                if opcode == 8:
                    return f"closed {int.from_bytes(payload[:2], 'big')}"
            return "connection closed by the server"
        finally:
            writer.close()

    async def bystander(done: asyncio.Event) -> float:
        connection = await Connection.open(server.port)
        slowest = 0.0
        number = 0
        while not done.is_set() and number < 100_000:
            started = time.monotonic()
            await asyncio.wait_for(connection.echo(f"b{number}"), 60)
            slowest = max(slowest, time.monotonic() - started)
            number += 1
            await asyncio.sleep(0.01)  # paces the bystander: about 100 echoes a second
        await connection.close()
        return slowest

    async def sample_rss(done: asyncio.Event) -> int:
        peak = server.rss_kib()
        while not done.is_set():
            peak = max(peak, server.rss_kib())
            await asyncio.sleep(0.05)  # another process's RSS: nothing to wait on but /proc
        return peak

    rss_before, cpu_before = server.rss_kib(), server.cpu_seconds()
    started = time.monotonic()
    done = asyncio.Event()
    watcher = asyncio.ensure_future(bystander(done))
    sampler = asyncio.ensure_future(sample_rss(done))
    try:
        outcomes = await bounded_gather([attack for _ in range(attackers)], attackers, 300)
    finally:
        done.set()
        slowest, peak = await asyncio.gather(watcher, sampler)
    seconds = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu_before
    kinds = sorted({str(o) for o in outcomes})
    return {
        "attackers": f"{attackers}, each one {size // 1024} KiB message in 1-byte fragments",
        "outcome": ", ".join(kinds),
        "server CPU": f"{cpu:.2f} s ({cpu / attackers:.2f} s per message)",
        "server peak RSS growth": f"{(peak - rss_before) / 1024:.1f} MiB",
        "a normal client's slowest echo meanwhile": f"{slowest * 1000:.0f} ms",
        "time": f"{seconds:.1f} s",
    }


async def recovery(server: Server, baseline_fds: int) -> dict[str, Any]:
    started = time.monotonic()
    # Another process's descriptors: nothing to wait on but /proc, read every 50 ms for at most a minute.
    while server.descriptors() > baseline_fds and time.monotonic() - started < 60:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - started
    descriptors = server.descriptors()
    connection = await Connection.open(server.port)
    served = await connection.echo("after") == (1, b"after")
    await connection.close()
    return {
        "descriptors": f"{descriptors} (baseline {baseline_fds})",
        "recovery time": f"{seconds:.2f} s",
        "fresh client served": served,
    }


async def ordeal(
    scale: float, rounds: int, backend: str, max_fragments: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    server = Server(backend, max_fragments)
    try:
        warm = await Connection.open(server.port)
        await warm.echo("warm up")
        await warm.close()
        await asyncio.sleep(0.2)  # let the warm-up connection's descriptor go
        baseline_fds, baseline_rss = server.descriptors(), server.rss_kib()
        phases: list[tuple[str, dict[str, Any]]] = [
            ("baseline", {"server RSS": f"{baseline_rss / 1024:.1f} MiB", "descriptors": baseline_fds})
        ]
        for number in range(1, rounds + 1):
            # The same ordeal again: a leak would show as RSS or descriptors growing round after round.
            label = f" (round {number})" if rounds > 1 else ""
            phases.append(("hold" + label, await phase_hold(server, max(10, int(5000 * scale)), 3)))
            phases.append(("crash" + label, await phase_crash(server, max(10, int(500 * scale)), 50, number)))
            phases.append(("resets" + label, await phase_resets(server, max(10, int(5000 * scale)))))
            phases.append(("storm" + label, await phase_storm(server, max(10, int(5000 * scale)))))
            phases.append(("garbage" + label, await phase_garbage(server, max(10, int(1000 * scale)), number)))
            phases.append(("fragments" + label, await phase_fragments(server, 3, max(4096, int((1 << 20) * scale)))))
            phases.append(("recovery" + label, await recovery(server, baseline_fds)))
            phases.append(
                ("after" + label, {"server alive": server.alive(), "server RSS": f"{server.rss_kib() / 1024:.1f} MiB"})
            )
        return phases
    finally:
        server.stop()


async def fragments_alone(scale: float, backend: str, max_fragments: int | None) -> list[tuple[str, dict[str, Any]]]:
    server = Server(backend, max_fragments)
    try:
        warm = await Connection.open(server.port)
        await warm.echo("warm up")
        await warm.close()
        phases: list[tuple[str, dict[str, Any]]] = [("baseline", {"server RSS": f"{server.rss_kib() / 1024:.1f} MiB"})]
        phases.append(("fragments", await phase_fragments(server, 3, max(4096, int((1 << 20) * scale)))))
        phases.append(("after", {"server alive": server.alive(), "server RSS": f"{server.rss_kib() / 1024:.1f} MiB"}))
        return phases
    finally:
        server.stop()


async def wait_for_descriptors(server: Server, baseline: int, limit: float) -> tuple[int, float]:
    """Read the server's descriptor count every 50 ms until it is back to ``baseline`` (at most ``limit`` s)."""
    started = time.monotonic()
    # Another process's descriptors: nothing to wait on but /proc.
    while server.descriptors() > baseline and time.monotonic() - started < limit:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return server.descriptors(), time.monotonic() - started


async def jammed_alone(
    scale: float, rounds: int, backend: str, max_connections: int
) -> list[tuple[str, dict[str, Any]]]:
    """Clients that complete the handshake, ask for 1 MiB and never read, twice ``max_connections`` per round."""
    idle = 1.0
    server = Server(backend, options=["--max-connections", str(max_connections), "--idle-timeout", str(idle)])
    jammers = max(2 * max_connections, int(2 * max_connections * scale))
    try:
        warm = await Connection.open(server.port)
        await warm.echo("warm up")
        await warm.close()
        await asyncio.sleep(0.2)  # let the warm-up connection's descriptor go
        baseline_fds = server.descriptors()
        baseline_rss = server.rss_kib()
        phases: list[tuple[str, dict[str, Any]]] = [
            (
                "baseline",
                {
                    "server": f"max_connections {max_connections}, idle_timeout {idle:g} s",
                    "server RSS": f"{baseline_rss / 1024:.1f} MiB",
                    "descriptors": baseline_fds,
                },
            )
        ]
        for number in range(1, rounds + 1):
            held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            peak = baseline_fds

            async def jam(held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = held) -> str:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                held.append((reader, writer))
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # jam early
                writer.write(UPGRADE + frame(1, b"jam"))
                await writer.drain()
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return "not upgraded"
                return "upgraded, never reads" if head.startswith(b"HTTP/1.1 101 ") else "refused"

            async def sample(done: asyncio.Event) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, server.descriptors())
                    await asyncio.sleep(0.02)  # another process's descriptors: nothing to wait on but /proc

            started = time.monotonic()
            done = asyncio.Event()
            sampler = asyncio.ensure_future(sample(done))
            try:
                outcomes = await bounded_gather([jam for _ in range(jammers)], jammers, 60)
                # The jammers keep their sockets open, unread: the server must let go of them itself.
                descriptors, seconds = await wait_for_descriptors(server, baseline_fds, 60)
            finally:
                done.set()
                await sampler
            counts: dict[str, int] = {}
            for outcome in outcomes:
                key = outcome if isinstance(outcome, str) else type(outcome).__name__
                counts[key] = counts.get(key, 0) + 1
            connection = await asyncio.wait_for(Connection.open(server.port), 10)
            served = await asyncio.wait_for(connection.echo("after"), 10) == (1, b"after")
            await connection.close()
            for _, writer in held:
                writer.close()
            phases.append(
                (
                    f"jammed (round {number})",
                    {
                        "jamming clients": f"{jammers}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
                        "server descriptors at peak": f"{peak} (baseline {baseline_fds}, +{peak - baseline_fds})",
                        "server descriptors while the jammers still hold their sockets": descriptors,
                        "time until back to baseline": f"{seconds:.2f} s",
                        "fresh client served": served,
                        "time": f"{time.monotonic() - started:.1f} s",
                    },
                )
            )
            await wait_for_descriptors(server, baseline_fds, 10)
        phases.append(("after", {"server alive": server.alive(), "server RSS": f"{server.rss_kib() / 1024:.1f} MiB"}))
        return phases
    finally:
        server.stop()


async def tls_alone(scale: float, rounds: int, backend: str) -> list[tuple[str, dict[str, Any]]]:
    """Rounds of TLS connections that complete the WebSocket handshake and are reset by the client."""
    import ssl
    import tempfile

    import trustme

    authority = trustme.CA()
    count = max(20, int(1000 * scale))
    with tempfile.TemporaryDirectory() as directory:
        certfile = os.path.join(directory, "server.pem")
        authority.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(certfile)
        client = ssl.create_default_context()
        authority.configure_trust(client)
        server = Server(backend, options=["--certfile", certfile])

    async def open_tls() -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client, server_hostname="localhost"
        )
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError(head[:40])
        return Connection(reader, writer)

    async def open_and_reset() -> None:
        connection = await open_tls()
        connection.reset()

    try:
        warm = await open_tls()
        await warm.echo("warm up")
        await warm.close()
        await asyncio.sleep(0.2)  # let the warm-up connection's descriptor go
        baseline_fds = server.descriptors()
        phases: list[tuple[str, dict[str, Any]]] = [
            ("baseline", {"server RSS": f"{server.rss_kib() / 1024:.1f} MiB", "descriptors": baseline_fds})
        ]
        for number in range(1, rounds + 1):
            started = time.monotonic()
            results = await bounded_gather([open_and_reset for _ in range(count)], 100, 180)
            descriptors, _ = await wait_for_descriptors(server, baseline_fds, 30)
            phases.append(
                (
                    f"tls (round {number})",
                    {
                        "TLS connections upgraded then reset": f"{sum(1 for r in results if r is None)} of {count}",
                        "descriptors after": f"{descriptors} (baseline {baseline_fds})",
                        "server RSS after": f"{server.rss_kib() / 1024:.1f} MiB",
                        "time": f"{time.monotonic() - started:.1f} s",
                    },
                )
            )
        connection = await open_tls()
        served = await connection.echo("after") == (1, b"after")
        await connection.close()
        phases.append(("after", {"server alive": server.alive(), "fresh TLS client served": served}))
        return phases
    finally:
        server.stop()


def report(phases: list[tuple[str, dict[str, Any]]], command: str) -> str:
    lines = ["| phase | measure | value |", "|---|---|---:|"]
    for name, values in phases:
        for key, value in values.items():
            lines.append(f"| {name} | {key} | {value} |")
    return f"Command: `{command}`\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="run the ordeal this many times (default 2)")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"], help="the server's backend")
    parser.add_argument(
        "--max-fragments", type=int, default=None, help="the server's max_fragments option (default: its default)"
    )
    parser.add_argument(
        "--only",
        choices=["fragments", "jammed", "tls"],
        help="run this phase alone (fragments: one round; jammed and tls: --rounds rounds)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=None, help="the server's max_connections (default: 20 for jammed)"
    )
    parser.add_argument("--idle-timeout", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--certfile", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_descriptor_limit()
    if args.serve:
        if args.max_connections is None:
            args.max_connections = 100_000
        serve(args.backend, args.max_fragments, args)
        return
    if args.only == "fragments":
        phases = asyncio.run(fragments_alone(args.scale, args.backend, args.max_fragments))
    elif args.only == "jammed":
        limit = args.max_connections if args.max_connections is not None else 20
        phases = asyncio.run(jammed_alone(args.scale, max(1, args.rounds), args.backend, limit))
    elif args.only == "tls":
        phases = asyncio.run(tls_alone(args.scale, max(1, args.rounds), args.backend))
    else:
        phases = asyncio.run(ordeal(args.scale, max(1, args.rounds), args.backend, args.max_fragments))
    command = "python benchmarks/stress.py" + (f" --scale {args.scale:g}" if args.scale != 1 else "")
    command += f" --rounds {args.rounds}" if args.rounds != 2 else ""
    command += f" --backend {args.backend}" if args.backend != "asyncio" else ""
    command += f" --max-fragments {args.max_fragments}" if args.max_fragments is not None else ""
    command += f" --max-connections {args.max_connections}" if args.max_connections is not None else ""
    command += f" --only {args.only}" if args.only else ""
    text = report(phases, command)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"stress-{args.backend}.md").write_text(text)


if __name__ == "__main__":
    main()
