"""The TLS load generator (the C one speaks no TLS): asyncio clients, in one or several processes.

    python benchmarks/tlsload.py idle PORT --conns 5000            # prints "opened=N", holds until stdin closes
    python benchmarks/tlsload.py churn PORT --parallel 50 --duration 5 --processes 2

``idle`` opens ``--conns`` TLS connections, upgrades each to WebSocket, prints ``opened=N`` and holds
them until its standard input closes (``run.py`` measures the server's RSS meanwhile). ``churn`` runs
``--parallel`` loops (shared out among ``--processes`` processes), each opening a TLS connection,
upgrading it, sending a close frame, reading the server's, and closing: it prints ``rate=`` (complete
handshakes a second, over every process) and the p50/p99 of one such round trip. Every client makes a
full TLS handshake (no session resumption) and does not verify the certificate (the server's work is
the same; a client's is smaller). Every wait is bounded by a timeout, every loop by count or time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import ssl
import statistics
import sys
import time

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: A masked close frame, code 1000 (mask 0: the payload is sent as is).
CLOSE = b"\x88\x82\x00\x00\x00\x00\x03\xe8"
TIMEOUT = 30.0


def client_context() -> ssl.SSLContext:
    """TLS 1.2 or 1.3 as the server offers, no verification, no session reuse (a full handshake each time)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def raise_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_upgraded(port: int, context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost", ssl_handshake_timeout=TIMEOUT
    )
    writer.write(UPGRADE)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 "):
        writer.close()
        raise ConnectionError(f"no upgrade: {head[:40]!r}")
    return reader, writer


async def idle(port: int, count: int) -> None:
    context = client_context()
    held: list[asyncio.StreamWriter] = []
    semaphore = asyncio.Semaphore(200)  # handshakes in flight at once, not to overrun the listen backlog

    async def one() -> None:
        async with semaphore:
            _, writer = await open_upgraded(port, context)
            held.append(writer)

    results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count)), return_exceptions=True), 600)
    errors = [r for r in results if isinstance(r, BaseException)]
    print(f"opened={len(held)} errors={len(errors)}", flush=True)
    if errors:
        print(f"first error: {errors[0]!r}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # held until run.py closes our stdin
    for writer in held:
        writer.transport.abort()


async def churn_loop(port: int, deadline: float, context: ssl.SSLContext, times: list[float]) -> int:
    done = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        reader, writer = await open_upgraded(port, context)
        writer.write(CLOSE)
        reply = await reader.readexactly(2)
        if reply[0] != 0x88:
            raise ConnectionError(f"no close frame: {reply!r}")
        writer.transport.abort()  # the server closed the TCP connection already or will
        times.append(time.monotonic() - started)
        done += 1
    return done


async def churn(port: int, parallel: int, duration: float) -> tuple[int, list[float]]:
    context = client_context()
    times: list[float] = []
    deadline = time.monotonic() + duration
    results = await asyncio.wait_for(
        asyncio.gather(*(churn_loop(port, deadline, context, times) for _ in range(parallel))), duration + TIMEOUT
    )
    return sum(results), times


def churn_process(port: int, parallel: int, duration: float, start_at: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    raise_descriptor_limit()
    time.sleep(max(0.0, start_at - time.time()))  # every process starts at once
    try:
        queue.put(asyncio.run(churn(port, parallel, duration)))
    except BaseException as error:
        queue.put(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["idle", "churn"])
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    raise_descriptor_limit()
    if args.mode == "idle":
        asyncio.run(idle(args.port, args.conns))
        return
    processes = max(1, min(args.processes, args.parallel))
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 0.5
    shares = [args.parallel // processes + (1 if i < args.parallel % processes else 0) for i in range(processes)]
    cpu_before = os.times()
    children = [
        multiprocessing.Process(target=churn_process, args=(args.port, share, args.duration, start_at, queue))
        for share in shares
    ]
    for child in children:
        child.start()
    outcomes = [queue.get(timeout=args.duration + 2 * TIMEOUT) for _ in children]
    for child in children:
        child.join(TIMEOUT)
    cpu_after = os.times()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        print(f"a client process failed: {failed[0]!r}", file=sys.stderr, flush=True)
        sys.exit(1)
    total = sum(o[0] for o in outcomes)
    times = sorted(t for o in outcomes for t in o[1])
    # The clients' CPU time, in cores: near the number of client cores means the clients were the limit.
    busy = (cpu_after.children_user + cpu_after.children_system - cpu_before.children_user - cpu_before.children_system)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] if times else 0.0
    print(
        f"rate={total / args.duration:.1f} count={total} p50_ms={statistics.median(times) * 1000 if times else 0:.2f}"
        f" p99_ms={p99 * 1000:.2f} client_cores={busy / args.duration:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
