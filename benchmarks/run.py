"""Run the benchmark suite: every server, the same scenarios, the same C load generator, one run.

    pip install -e '.[bench]'
    python benchmarks/run.py                  # everything (about 10 minutes)
    python benchmarks/run.py --quick          # 2 s per scenario, one run each
    python benchmarks/run.py --servers pywsserver websockets --scenarios small broadcast
    python benchmarks/run.py --cluster        # broadcast across 2 nodes on Redis (needs redis-server)
    python benchmarks/run.py --scenarios tls-idle tls-churn --servers pywsserver websockets

The load generator (``loadgen.c``) is built with the system compiler. The server runs pinned to CPU 0
and the load generator to CPU 1 (``taskset``). A raw TCP echo server (no WebSocket framing) runs the
small and pipelined scenarios first: it shows how far the generator goes, far above any WebSocket
server. The TLS scenarios (``tls-idle``, ``tls-churn``) use ``tlsload.py`` instead (asyncio clients in
Python: the C generator has no TLS), against the servers that serve TLS, all with one self-signed
certificate made at run time (``trustme``). Results go to the terminal and to
``benchmarks/results/latest.md`` and ``latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
REFERENCE = "websockets"

SERVERS = [
    "pywsserver",
    "pywsserver-uvloop",
    "pywsserver-trio",
    "websockets",
    "websockets-uvloop",
    "aiohttp",
    "picows",
    "naive-anyio-wsproto",
]

# name: (load generator arguments, how many runs to take the median of, unit)
SCENARIOS: dict[str, tuple[list[str], int, str]] = {
    "small": (["echo", "--conns", "100", "--depth", "1", "--size", "64"], 3, "msgs/s"),
    "pipelined": (["echo", "--conns", "100", "--depth", "16", "--size", "64"], 3, "msgs/s"),
    "large": (["echo", "--conns", "10", "--depth", "1", "--size", "65536", "--binary"], 3, "msgs/s"),
    "idle": (["idle", "--conns", "10000"], 1, "KiB/conn"),
    # One message to everyone, the next once all have it (p50/p99: time until all received one).
    "broadcast": (
        ["broadcast", "--conns", "2000", "--count", "50", "--size", "64", "--one-at-a-time"],
        3,
        "deliveries/s",
    ),
    # 50 messages to everyone at once (a burst: the server may batch them per connection).
    "broadcast-burst": (["broadcast", "--conns", "2000", "--count", "50", "--size", "64"], 3, "deliveries/s"),
    # TLS (tlsload.py, not the C generator): 5,000 TLS connections held open (server RSS per connection),
    # then TLS handshake + WebSocket upgrade + close, 50 in parallel from 2 client processes.
    "tls-idle": (["idle", "--conns", "5000"], 1, "KiB/conn"),
    "tls-churn": (["churn", "--parallel", "50", "--processes", "2"], 3, "handshakes/s"),
    # Last: its hundreds of thousands of short connections leave the kernel's accept path busy
    # (SYN cookies, sockets in TIME_WAIT) for a while, which made the next scenario's peers fail.
    "churn": (["churn", "--parallel", "50"], 3, "handshakes/s"),
}


#: The scenarios over TLS, and the servers that serve TLS (``BENCH_CERTFILE`` in ``servers.py``).
TLS_SCENARIOS = {"tls-idle", "tls-churn"}
TLS_SERVERS = {
    *("pywsserver", "pywsserver-uvloop", "pywsserver-trio", "websockets", "websockets-uvloop", "aiohttp", "picows")
}
TLSLOAD = HERE / "tlsload.py"


#: The scenarios measured against a minimal WebSocket server in C as well (``wsceiling.c``), and its label.
#: Not large: with 64 KiB messages that simple server is slower than pywsserver (35,000 against 40,500
#: msgs/s in one quick run), so it would be no ceiling there. Not pipelined: there the generator itself
#: is the limit, and every server and echo, in C or in Python, lands between about 160,000 and 225,000
#: msgs/s from run to run, in no fixed order.
WS_CEILING_SCENARIOS = {"small", "broadcast", "broadcast-burst", "churn"}
WS_CEILING = "C WebSocket server (generator ceiling)"


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def build(name: str) -> Path:
    BUILD.mkdir(exist_ok=True)
    binary = BUILD / name
    source = HERE / f"{name}.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def parse(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in line.split() if "=" in item)}


class Server:
    def __init__(
        self,
        name: str,
        command: list[str] | None = None,
        cpus: str = "0",
        processes: int = 1,
        certfile: str | None = None,
    ) -> None:
        self.name = name
        taskset = ["taskset", "-c", cpus] if pin(0) else []
        environment = {**os.environ, "BENCH_CERTFILE": certfile} if certfile else None
        self.process = subprocess.Popen(
            [*taskset, *(command or [sys.executable, str(HERE / "servers.py"), name, "0"])],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=environment,
        )
        assert self.process.stdout is not None
        for _ in range(processes):  # every server process says when it listens
            line = self.process.stdout.readline()
            if not line.startswith("ready"):
                self.process.kill()
                raise RuntimeError(f"{name} did not start")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.process.terminate()  # a parent of server processes stops its children first
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_loadgen(
    loadgen: Path, port: int, arguments: list[str], duration: float, raw: bool = False, cpu: int = 1
) -> dict[str, float]:
    mode, *rest = arguments
    command = [*pin(cpu), str(loadgen), mode, str(port), *rest, "--duration", str(duration)]
    if raw:
        command.append("--raw")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"loadgen exited with {result.returncode}")
    return parse(result.stdout)


def run_tlsload(port: int, arguments: list[str], duration: float) -> dict[str, float]:
    mode, *rest = arguments
    command = [*pin(1), sys.executable, str(TLSLOAD), mode, str(port), *rest, "--duration", str(duration)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"tlsload exited with {result.returncode}")
    return parse(result.stdout)


def cpu_times(pid: int) -> tuple[float, float]:
    """The process's user and system CPU time so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far."""
    return sum(cpu_times(pid))


def tls_churn(server: Server, arguments: list[str], duration: float) -> dict[str, float]:
    """Handshakes/s over TLS, with the server's CPU use: near 1 core, the server (not the clients) was the limit."""
    before, started = cpu_seconds(server.process.pid), time.monotonic()
    row = run_tlsload(server.port, arguments, duration)
    used = cpu_seconds(server.process.pid) - before
    row["server_cores"] = used / (time.monotonic() - started)
    # What the machine's load moves least: the server's CPU time per handshake.
    row["server_cpu_ms"] = 1000 * used / max(row.get("count", 0), 1)
    return row


@contextlib.contextmanager
def certificate() -> Iterator[str]:
    """A self-signed certificate chain and key for localhost and 127.0.0.1, in a PEM file (``trustme``)."""
    import trustme

    with tempfile.TemporaryDirectory() as directory:
        certfile = os.path.join(directory, "server.pem")
        trustme.CA().issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(certfile)
        yield certfile


def idle_per_connection(loadgen: Path | None, server: Server, arguments: list[str]) -> dict[str, float]:
    """Server RSS growth per connection held open (``loadgen None``: over TLS, with ``tlsload.py``)."""
    before = rss_kib(server.process.pid, "VmRSS")
    mode, *rest = arguments
    client = [sys.executable, str(TLSLOAD)] if loadgen is None else [str(loadgen)]
    generator = subprocess.Popen(
        [*pin(1), *client, mode, str(server.port), *rest],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert generator.stdout is not None
    assert generator.stdin is not None
    line = generator.stdout.readline()
    opened = parse(line).get("opened", 0)
    wanted = int(rest[rest.index("--conns") + 1])
    if opened < wanted:
        generator.kill()
        raise RuntimeError(f"only {opened:.0f} of {wanted} connections opened")
    time.sleep(1.0)  # let the server finish the handshakes it has read
    after = rss_kib(server.process.pid, "VmRSS")
    generator.stdin.close()
    generator.wait(timeout=60)
    return {"rate": (after - before) / max(opened, 1), "opened": opened}


def run(args: argparse.Namespace) -> dict[str, Any]:
    loadgen = build("loadgen")
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "scenarios": {}, "baseline": {}}
    duration = args.duration
    # The generator's own ceiling: a C TCP echo server, no WebSocket framing. And the same with a
    # Python asyncio Protocol echo, the floor under every asyncio server.
    # The event loop's own limit: the same through a BufferedProtocol (one reused read buffer).
    for label, name, command in (
        ("C TCP echo (generator ceiling)", "raw-tcp-echo", [str(build("echoserver")), "0"]),
        ("Python asyncio TCP echo", "raw-tcp-echo", None),
        ("Python asyncio BufferedProtocol echo", "raw-buffered-echo", None),
    ):
        server = Server(name, command)
        try:
            for scenario in ("small", "pipelined"):
                arguments, _, _ = SCENARIOS[scenario]
                row = run_loadgen(loadgen, server.port, arguments, duration, raw=True)
                results["baseline"].setdefault(scenario, {})[label] = row
                print(f"baseline {label} {scenario}: {row['rate']:,.0f} msgs/s", flush=True)
        finally:
            server.stop()
    # Scenario by scenario, every server in turn, and the repeated runs interleaved (A B C A B C ...),
    # each on a fresh server: the figures compared in a table are measured minutes apart at most and
    # drift in this machine's speed falls on every server alike.
    certfile = None
    with contextlib.ExitStack() as stack:
        if TLS_SCENARIOS.intersection(args.scenarios):
            certfile = stack.enter_context(certificate())
        for scenario in args.scenarios:
            run_scenario(args, scenario, loadgen, certfile, results)
    return results


def run_scenario(
    args: argparse.Namespace, scenario: str, loadgen: Path, certfile: str | None, results: dict[str, Any]
) -> None:
    """Every server in turn, the runs interleaved; the medians go into ``results``."""
    duration = args.duration
    arguments, repeats, unit = SCENARIOS[scenario]
    tls = scenario in TLS_SCENARIOS
    servers = [name for name in args.servers if name in TLS_SERVERS] if tls else args.servers
    repeats = 1 if args.quick else (args.repeats if args.repeats and repeats > 1 else repeats)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    errors: dict[str, str] = {}
    if scenario in WS_CEILING_SCENARIOS:
        # What the generator, the kernel and loopback allow when the server costs next to nothing: a
        # minimal WebSocket server in C (wsceiling.c), once, just before the servers of the scenario.
        ceiling = Server("wsceiling", [str(build("wsceiling")), "0"])
        try:
            row = run_loadgen(loadgen, ceiling.port, arguments, duration)
        finally:
            ceiling.stop()
        results["baseline"].setdefault(scenario, {})[WS_CEILING] = row
        print(f"baseline {WS_CEILING} {scenario}: {row['rate']:,.0f} {unit}", flush=True)
    for _ in range(repeats):
        for name in servers:
            if name in errors:
                continue
            try:
                server = Server(name, certfile=certfile if tls else None)
                try:
                    if scenario == "idle":
                        row = idle_per_connection(loadgen, server, arguments)
                    elif scenario == "tls-idle":
                        row = idle_per_connection(None, server, arguments)
                    elif scenario == "tls-churn":
                        row = tls_churn(server, arguments, duration)
                    else:
                        row = run_loadgen(loadgen, server.port, arguments, duration)
                    row["peak_rss_kib"] = rss_kib(server.process.pid, "VmHWM")
                finally:
                    server.stop()
            except Exception as error:  # a peer that fails is reported, not fatal
                errors[name] = str(error)
                continue
            runs[name].append(row)
    for name in servers:
        if name in errors:
            results["scenarios"].setdefault(scenario, {})[name] = {"error": errors[name]}
            print(f"{name:22} {scenario:10} failed: {errors[name]}", flush=True)
            continue
        rates = [r["rate"] for r in runs[name]]
        median = statistics.median(rates)
        best = min(runs[name], key=lambda r: abs(r["rate"] - median))
        summary: dict[str, Any] = {**best, "rate": median, "runs": rates}
        results["scenarios"].setdefault(scenario, {})[name] = summary
        shown = ", ".join(f"{rate:,.0f}" for rate in rates)
        extra = ""
        if "server_cores" in best:  # near 1.0 the server was the limit; near 1.0 too, the clients were
            extra = (
                f", server {best['server_cores']:.2f} cores, clients {best['client_cores']:.2f} cores,"
                f" server CPU {best['server_cpu_ms']:.2f} ms/handshake"
            )
        print(f"{name:22} {scenario:10} {median:,.1f} {unit}  (runs: {shown}{extra})", flush=True)


def scaling(args: argparse.Namespace) -> str:
    """pywsserver with 1 and with 2 server processes (the ``processes`` option), side by side."""
    loadgen = build("loadgen")
    cores = os.cpu_count() or 1
    # With a third core the generator gets it to itself; on two, it shares the second with a server process.
    generator_cpu = 2 if cores >= 3 else 1
    rows = []
    for scenario in ("small", "pipelined"):
        arguments, repeats, _ = SCENARIOS[scenario]
        rates = {}
        for processes, cpus in ((1, "0"), (2, "0,1")):
            name = "pywsserver-1-process" if processes == 1 else "pywsserver-2-processes"
            server = Server(name, cpus=cpus, processes=processes)
            try:
                runs = [
                    run_loadgen(loadgen, server.port, arguments, args.duration, cpu=generator_cpu)["rate"]
                    for _ in range(1 if args.quick else repeats)
                ]
            finally:
                server.stop()
            rates[processes] = statistics.median(runs)
            print(f"{name:24} {scenario:10} {rates[processes]:,.0f} msgs/s", flush=True)
        rows.append(f"| {scenario} | {rates[1]:,.0f} | {rates[2]:,.0f} | {rates[2] / rates[1]:.2f}x |")
    where = (
        "the generator on its own core (CPU 2)"
        if generator_cpu == 2
        else "only 2 cores: the generator shares CPU 1 with the second server process"
    )
    info = machine()
    return "\n".join(
        [
            f"Machine: {info['cpu']}, {cores} cores, Python {info['python']}; {where}. Command: `{' '.join(sys.argv)}`",
            "",
            "| scenario | 1 process (msgs/s) | 2 processes (msgs/s) | scaling |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


#: The cluster comparison: (server, CPUs it may use, its processes).
CLUSTER_SERVERS = [
    ("pywsserver", "0", 1),
    ("pywsserver-cluster-1-node", "0", 1),
    ("pywsserver-cluster-2-nodes", "0,1", 2),
    ("websockets-redis-2-processes", "0,1", 2),
]


#: The cluster comparison's scenarios: broadcast (200 rounds, not the main suite's 50: a run of 50 lasts
#: 1 to 3 s, too short for a machine shared with other work) and broadcast-burst as in the main suite,
#: and "hop": one message at a time to 20 connections, where the time until all have it is mostly the
#: way through Redis (for the servers with two processes).
CLUSTER_SCENARIOS = {
    "broadcast": ["broadcast", "--conns", "2000", "--count", "200", "--size", "64", "--one-at-a-time"],
    "broadcast-burst": SCENARIOS["broadcast-burst"][0],
    "hop": ["broadcast", "--conns", "20", "--count", "200", "--size", "64", "--one-at-a-time"],
}


def server_cpu_seconds(server: Server) -> tuple[float, float]:
    """User and system CPU time so far of the server's process and of the server processes it started."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *(int(child) for child in children.read_text().split())] if children.exists() else [pid]
    times = [cpu_times(each) for each in pids]
    return sum(user for user, _ in times), sum(system for _, system in times)


def process_cpu_seconds(pid: int) -> float:
    """CPU time so far of one process (Redis's main thread), to the nanosecond (/proc's schedstat, not
    its 10 ms ticks: Redis spends a few µs per broadcast)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time of the whole machine so far, all cores: busy (anything but idle and iowait), and total."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    total = sum(fields) / os.sysconf("SC_CLK_TCK")
    return total - (fields[3] + fields[4]) / os.sysconf("SC_CLK_TCK"), total


def generator_cpu_seconds() -> float:
    """User + system CPU time of this script's finished child processes (the generator runs)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cluster_run(
    loadgen: Path, server: Server, arguments: list[str], duration: float, redis_pid: int
) -> dict[str, float]:
    """One measured run, with the CPU time per delivery of the servers (user, system), of the generator
    and of Redis, and how busy the machine's cores were meanwhile.

    The generator runs twice: once with a single message (connections, handshakes, one message,
    closes), then the run measured, which does the same with all its messages; the differences of
    the CPU times between the two are what the other messages cost, without the handshakes. The
    cores' busy share is the whole machine's (other work included) during the run measured: near
    100% the run was bound by CPU, well below it by the waits of its rounds.
    """
    count = arguments.index("--count") + 1
    single = [*arguments[:count], "1", *arguments[count + 1 :]]

    def sample() -> tuple[tuple[float, float], float, float]:
        return server_cpu_seconds(server), generator_cpu_seconds(), process_cpu_seconds(redis_pid)

    before = sample()
    first = run_loadgen(loadgen, server.port, single, duration)
    middle, busy_before = sample(), machine_busy_seconds()
    row = run_loadgen(loadgen, server.port, arguments, duration)
    after, busy_after = sample(), machine_busy_seconds()
    extra = row["deliveries"] - first["deliveries"]

    def spent(start: float, end: float, finish: float) -> float:
        return (finish - end) - (end - start)

    row["server_user_us"] = spent(before[0][0], middle[0][0], after[0][0]) / extra * 1e6
    row["server_system_us"] = spent(before[0][1], middle[0][1], after[0][1]) / extra * 1e6
    row["generator_us"] = spent(before[1], middle[1], after[1]) / extra * 1e6
    connections = int(arguments[arguments.index("--conns") + 1]) + 1  # the listeners and the control one
    row["redis_us_per_broadcast"] = spent(before[2], middle[2], after[2]) / (extra / connections) * 1e6
    row["cores_busy"] = (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1])
    return row


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free loopback port, in a temporary directory, without persistence: its URL."""
    with redis_process() as (url, _):
        yield url


@contextlib.contextmanager
def redis_process() -> Iterator[tuple[str, int]]:
    """`redis_server`, and its process id."""
    import socket
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("the cluster benchmark needs redis-server (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""]
        process = subprocess.Popen([*command, "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", process.pid
        finally:
            process.terminate()
            process.wait(10)


def start(name: str, cpus: str, processes: int, attempts: int = 3) -> Server:
    """A server, started again if it fails to (a port's leftovers from the previous run, a slow Redis)."""
    for attempt in range(attempts):
        try:
            return Server(name, cpus=cpus, processes=processes)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def cluster(args: argparse.Namespace) -> str:
    """Broadcast to 2,000 connections over two nodes on Redis, beside one node and websockets + redis-py."""
    loadgen = build("loadgen")
    scenarios = {name: value for name, value in CLUSTER_SCENARIOS.items() if name in (args.scenarios or [name])}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    load_at_start = os.getloadavg()[0]
    with redis_process() as (url, redis_pid):
        os.environ["BENCH_REDIS_URL"] = url
        for scenario, arguments in scenarios.items():
            for _ in range(1 if args.quick else (args.repeats or 3)):
                for name, cpus, processes in CLUSTER_SERVERS:  # interleaved, a fresh server each run
                    server = start(name, "0" if args.cluster_layout == "apart" else cpus, processes)
                    try:
                        row = cluster_run(loadgen, server, arguments, args.duration, redis_pid)
                    finally:
                        server.stop()
                    runs.setdefault((scenario, name), []).append(row)
                    print(
                        f"{name:30} {scenario:16} {row['rate']:,.0f} deliveries/s; CPU per delivery: server "
                        f"{row['server_user_us']:.2f} µs user + {row['server_system_us']:.2f} system, "
                        f"generator {row['generator_us']:.2f}; Redis {row['redis_us_per_broadcast']:.1f} µs per "
                        f"broadcast; cores busy {row['cores_busy']:.0%}",
                        flush=True,
                    )
    info = machine()
    layout = (
        "every server process on CPU 0 (layout apart)"
        if args.cluster_layout == "apart"
        else "one-process servers on CPU 0, two-process ones on CPUs 0 and 1 (layout spread)"
    )
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; {layout},"
        f" the generator on CPU 1, redis-server unpinned; load average"
        f" {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Command: `{' '.join(sys.argv)}`",
        "",
        "| server | scenario | deliveries/s | p50 ms | p99 ms | vs websockets + redis-py "
        "| server CPU µs/delivery (user + system) | websockets + redis-py's / ours | generator CPU µs/delivery "
        "| Redis CPU µs/broadcast | cores busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in scenarios:
        medians = {}
        for name, _, _ in CLUSTER_SERVERS:
            rows = runs[(scenario, name)]
            median = statistics.median(r["rate"] for r in rows)
            user = statistics.median(r["server_user_us"] for r in rows)
            system = statistics.median(r["server_system_us"] for r in rows)
            generator = statistics.median(r["generator_us"] for r in rows)
            redis = statistics.median(r["redis_us_per_broadcast"] for r in rows)
            busy = statistics.median(r["cores_busy"] for r in rows)
            row = min(rows, key=lambda r: abs(r["rate"] - median))
            medians[name] = (median, user, system, generator, redis, busy, row)
        reference, reference_user, reference_system, *_ = medians["websockets-redis-2-processes"]
        for name, (median, user, system, generator, redis, busy, row) in medians.items():
            p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else ""
            p99 = f"{row['p99_ms']:.2f}" if "p99_ms" in row else ""
            cpu = user + system
            lines.append(
                f"| {name} | {scenario} | {median:,.0f} | {p50} | {p99} | {median / reference:.2f}x "
                f"| {cpu:.2f} ({user:.2f} + {system:.2f}) | {(reference_user + reference_system) / cpu:.2f}x "
                f"| {generator:.2f} | {redis:.1f} | {busy:.0%} |"
            )
    ours, theirs = "pywsserver-cluster-2-nodes", "websockets-redis-2-processes"
    lines += [
        "",
        "Two nodes against websockets + redis-py, run by run (each pair measured back to back):",
        "",
        *(
            f"- {scenario}: "
            + ", ".join(
                f"{mine['rate'] / other['rate']:.2f}x"
                for mine, other in zip(runs[(scenario, ours)], runs[(scenario, theirs)], strict=True)
            )
            for scenario in scenarios
        ),
        "",
        "deliveries/s and p50/p99: the median run. CPU per delivery: medians of the runs, what the messages"
        " cost beyond one (handshakes left out, see cluster_run), in the clock ticks of /proc (10 ms): the"
        " bursts' figures are few ticks, rough. Server: every process of the server. Redis: redis-server's"
        " CPU per broadcast, the same way but to the nanosecond (/proc's schedstat); without a cluster,"
        " Redis idles. Cores busy: the whole machine's (other work included) during the run measured.",
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"Python {results['machine']['python']}. Command: `{results['command']}`",
        "",
    ]
    for scenario, rows in results["scenarios"].items():
        _, _, unit = SCENARIOS[scenario]
        reference = rows.get(REFERENCE, {}).get("rate")
        lower_is_better = scenario in ("idle", "tls-idle")
        lines += [f"### {scenario} ({unit})", ""]
        lines += [
            "| server | result | p50 ms | p99 ms | peak RSS MiB | vs websockets |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in rows.items():
            if "rate" not in row:
                lines.append(f"| {name} | failed | | | | |")
                continue
            ratio = ""
            if reference:
                ratio = f"{(reference / row['rate'] if lower_is_better else row['rate'] / reference):.2f}x"
            p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else ""
            p99 = f"{row['p99_ms']:.2f}" if "p99_ms" in row else ""
            lines.append(
                f"| {name} | {row['rate']:,.1f} | {p50} | {p99} | {row['peak_rss_kib'] / 1024:.1f} | {ratio} |"
            )
        cores = [
            f"{name} {row['server_cores']:.2f} ({row['server_cpu_ms']:.2f} ms a handshake)"
            for name, row in rows.items()
            if "server_cores" in row
        ]
        if cores:
            lines += ["", "Server CPU use (cores) during the median run: " + ", ".join(cores) + "."]
        for label, row in results["baseline"].get(scenario, {}).items():
            p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else ""
            p99 = f"{row['p99_ms']:.2f}" if "p99_ms" in row else ""
            lines.append(f"| *{label}* | {row['rate']:,.0f} | {p50} | {p99} | | |")
        lines.append("")
    lines.append("Ratios: higher is better, except idle memory where the ratio is websockets' KiB / ours.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers", nargs="+", default=SERVERS, choices=[*SERVERS, "pywsserver-without-tree", "pywsserver-nowatchdog"]
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=None,
        choices=[*SCENARIOS, "hop"],
        help="the scenarios to run (default: all; with --cluster: broadcast, broadcast-burst, hop)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 s per run, one run per scenario")
    parser.add_argument(
        "--repeats", type=int, default=0, help="runs per scenario to take the median of (default 3; idle: 1)"
    )
    parser.add_argument("--scaling", action="store_true", help="only measure pywsserver with 1 and 2 server processes")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="only the cluster comparison: 2 nodes on Redis, 1 node, websockets + redis-py (needs redis-server)",
    )
    parser.add_argument(
        "--cluster-layout",
        choices=["spread", "apart"],
        default="spread",
        help="with --cluster: a two-process server's processes on CPUs 0 and 1, the generator sharing CPU 1"
        " (spread, the default), or every server process on CPU 0 and the generator alone on CPU 1 (apart:"
        " as the main suite, the rate then measures the servers rather than their share of the cores)",
    )
    args = parser.parse_args()
    if not args.cluster:
        args.scenarios = args.scenarios or list(SCENARIOS)
        if "hop" in args.scenarios:
            parser.error("hop is a scenario of --cluster only")
    if args.quick:
        args.duration = 2.0
    if args.cluster:
        report = cluster(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cluster.md").write_text(report + "\n")
        print()
        print(report)
        return
    if args.scaling:
        report = scaling(args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scaling.md").write_text(report + "\n")
        print()
        print(report)
        return
    results = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    report = table(results)
    (RESULTS / "latest.md").write_text(report + "\n")
    print()
    print(report)


if __name__ == "__main__":
    main()
