"""Instructions per echoed message, counted by valgrind's callgrind: a figure that load does not move.

    python benchmarks/instructions.py                       # pywsserver, 64 B text messages
    python benchmarks/instructions.py --server picows raw-buffered-echo --messages 2000 20000
    python benchmarks/instructions.py --server pywsserver-trio --mode broadcast --messages 20 120
    python benchmarks/instructions.py --server pywsserver-trio --mode handshake --messages 50 250
    python benchmarks/instructions.py --server pywsserver-trio websockets --size 65536 --binary --messages 100 600

Wall-clock rates on a busy shared machine drift by 10-15% between runs; instruction counts do not. Each
server of ``servers.py`` is run under ``valgrind --tool=callgrind`` twice, and one client (in this
process, not under valgrind) opens one connection and echoes N messages one at a time (N1 the first
time, N2 the second); instructions per message = (total(N2) - total(N1)) / (N2 - N1), so start-up,
handshake and shutdown cancel out. The instructions are the server process's only (its event loop,
system-call wrappers and all), not the kernel's. Needs valgrind.

``--size`` sets the payload (frames of any length: ``--size 65536 --binary`` is the large scenario's
message). ``--mode broadcast``: 200 connections open; N rounds of one ``go:1:64`` message from the first, each
round over once every connection has its copy: instructions per delivery (one frame to one member).
``--mode handshake``: N connections opened one after another, each upgraded and closed (client close
frame, then the server's close): instructions per connection. ``--profile DIR`` keeps the second run's
callgrind output there, for ``callgrind_annotate``, and the first run's in ``DIR/SERVER/first``; it
also prints the functions whose own instructions grew most from the first run to the second, per
message (start-up cancels out as in the total): where a message's instructions go, C functions of
the interpreter and the extensions (a Python function's bytecode counts in the interpreter's loop).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Servers that speak no WebSocket (the client then sends and reads raw bytes of the same size).
RAW = {"raw-tcp-echo", "raw-buffered-echo"}


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def _handshake(sock: socket.socket) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("no handshake response")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {response[:80]!r}")


def _length_field(size: int) -> bytes:
    """The 7-bit length of a frame's second byte (mask bit not set), and its extended length if any."""
    if size < 126:
        return bytes((size,))
    if size < 65536:
        return bytes((126,)) + size.to_bytes(2, "big")
    return bytes((127,)) + size.to_bytes(8, "big")


def _masked_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A client's masked, unfragmented frame (text by default)."""
    mask = b"\x01\x02\x03\x04"
    size = len(payload)
    keys = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(size, "big")
    length = _length_field(len(payload))
    return bytes((0x80 | opcode, 0x80 | length[0])) + length[1:] + mask + masked


def _masked_text(payload: bytes) -> bytes:
    return _masked_frame(payload)


def _reply_size(size: int) -> int:
    """Bytes of the server's unmasked frame carrying ``size`` bytes."""
    return 1 + len(_length_field(size)) + size


def _echo(port: int, count: int, size: int, raw: bool, binary: bool = False) -> None:
    payload = b"x" * size
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if raw:
            request, answer = payload, size
        else:
            _handshake(sock)
            request, answer = _masked_frame(payload, 2 if binary else 1), _reply_size(size)
        for _ in range(count):
            sock.sendall(request)
            _receive_exactly(sock, answer)
        if not raw:
            sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000
            with_deadline = time.monotonic() + 30
            while time.monotonic() < with_deadline and sock.recv(4096):
                pass


#: Connections that receive each broadcast in ``--mode broadcast``.
MEMBERS = 200


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _handshake(sock)
    return sock


def _close(sock: socket.socket) -> None:
    sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000
    with_deadline = time.monotonic() + 30
    while time.monotonic() < with_deadline and sock.recv(4096):
        pass
    sock.close()


def _broadcast(port: int, rounds: int, size: int) -> None:
    members = [_connect(port) for _ in range(MEMBERS)]
    go = _masked_text(f"go:1:{size}".encode())
    frame = _reply_size(size)
    try:
        for _ in range(rounds):
            members[0].sendall(go)
            for sock in members:
                _receive_exactly(sock, frame)
    finally:
        for sock in members:
            _close(sock)


def _handshakes(port: int, count: int) -> None:
    for _ in range(count):
        _close(_connect(port))


@contextlib.contextmanager
def under_callgrind(arguments: list[str], out: Path, what: str) -> Iterator[int]:
    """``python *arguments`` under callgrind (its counts to ``out``) for the block: the port it is ready on."""
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"{what} did not start under valgrind")
        yield int(line.split()[1])
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def callgrind_total(out: Path, what: str) -> int:
    """The instruction total of a callgrind output file."""
    summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if summary is None:
        raise RuntimeError(f"no instruction total in {what}'s callgrind output")
    return int(summary.group(1))


def count_instructions(
    server: str, count: int, size: int, mode: str = "echo", keep: Path | None = None, binary: bool = False
) -> int:
    """Total instructions of one run of ``server`` doing ``count`` rounds of ``mode`` (start-up included)."""
    with tempfile.TemporaryDirectory() as directory:
        out = (keep or Path(directory)) / "callgrind.out"
        with under_callgrind([str(HERE / "servers.py"), server, "0"], out, server) as port:
            if mode == "broadcast":
                _broadcast(port, count, size)
            elif mode == "handshake":
                _handshakes(port, count)
            else:
                _echo(port, count, size, server in RAW, binary)
        return callgrind_total(out, server)


def _own_instructions(out: Path) -> dict[str, int]:
    """Each function's own instructions (exclusive) in a callgrind output, by ``callgrind_annotate``."""
    text = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", str(out)], capture_output=True, text=True, check=True
    ).stdout
    own: dict[str, int] = {}
    for match in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[[^\]]*\])?$", text, re.MULTILINE):
        name = match.group(2)
        if name == "PROGRAM TOTALS":
            continue
        own[name] = own.get(name, 0) + int(match.group(1).replace(",", ""))
    return own


def per_function(first: Path, second: Path, rounds: int, top: int = 25) -> list[tuple[str, float]]:
    """The ``top`` functions whose own instructions grew most from ``first`` to ``second``, per round."""
    low, high = _own_instructions(first), _own_instructions(second)
    growth = {name: (high.get(name, 0) - low.get(name, 0)) / rounds for name in high.keys() | low.keys()}
    return sorted(growth.items(), key=lambda item: -item[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", nargs="+", default=["pywsserver"], help="servers of servers.py")
    parser.add_argument(
        "--messages",
        nargs=2,
        type=int,
        metavar=("N1", "N2"),
        help="the rounds of the two runs (default 2000 12000; 20 120 with --mode broadcast, each round reaching "
        f"{MEMBERS} connections; the echo's rounds were seen to end in connection resets there under valgrind)",
    )
    parser.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    parser.add_argument("--binary", action="store_true", help="echo binary messages, not text (as the large scenario)")
    parser.add_argument("--mode", choices=["echo", "broadcast", "handshake"], default="echo")
    parser.add_argument("--profile", type=Path, help="keep the second run's callgrind output in this directory")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind")
    first, second = args.messages or ((20, 120) if args.mode == "broadcast" else (2000, 12000))
    per = {"echo": (1, "message"), "broadcast": (MEMBERS, "delivery"), "handshake": (1, "connection")}
    factor, unit = per[args.mode]
    for server in args.server:
        keep = keep_first = None
        if args.profile is not None:
            keep = args.profile / server
            keep_first = keep / "first"
            keep_first.mkdir(parents=True, exist_ok=True)
        low = count_instructions(server, first, args.size, args.mode, keep_first, args.binary)
        high = count_instructions(server, second, args.size, args.mode, keep, args.binary)
        figure = (high - low) / ((second - first) * factor)
        print(f"{server:24} {figure:,.0f} instructions per {unit} ({args.mode})", flush=True)
        if keep is not None and keep_first is not None:
            rounds = (second - first) * factor
            for name, own in per_function(keep_first / "callgrind.out", keep / "callgrind.out", rounds):
                print(f"    {own:10,.0f}  {name.rsplit('/', 1)[-1]}", flush=True)


if __name__ == "__main__":
    main()
