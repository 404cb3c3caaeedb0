"""The chat example (``examples/chat.py`` and its page) driven in a real browser: headless Chromium.

The page is where a user first sees pywsserver work, and a browser is the client that matters there: its
own handshake headers and ``Origin``, its permessage-deflate offer, the close it sends when a tab closes,
and the page's own reconnecting. So these tests start the example as a separate process on a free port
(on each anyio backend), open the page in Chromium and act as a person would: type, press Enter, close a
tab, restart the server. Every wait is for a DOM condition or a log line, bounded in time.

Chromium is driven with the Python ``playwright`` package (its sync API), not Node's ``playwright-core``:
the test stays in pytest beside the server process it starts, stops and restarts between two steps of
one page, with no second language and no protocol between a script and the test. Installing the package
downloads no browser (only ``playwright install`` would); the launch points it at the system's Chromium
(Debian's ``chromium``, or the executable named by ``PYWSSERVER_CHROMIUM``) with ``executable_path``,
with a fresh profile directory made by Playwright for each launch.

With the cluster backend, two pages served by two server processes (two nodes on one real
``redis-server``, or the two processes of ``--processes 2``) chat as well.

Where no Chromium is found the tests skip, saying how to install one; in CI (``CI=true``) they fail
instead. A screenshot of the page after the exchange is saved under ``PYWSSERVER_ARTIFACTS`` (pytest's
temporary directory when unset) and its path printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster_tools import RedisServer, free_port, running_redis

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "chat.py"
TIMEOUT = 20.0  # seconds, for every wait: a DOM condition, a log line, a process start or stop
HOW_TO_INSTALL = (
    "install Chromium (Debian: apt-get install chromium; or set PYWSSERVER_CHROMIUM to a Chromium or Chrome "
    "executable) and the playwright package (pip install -e '.[test]')"
)
# What this machine's closed network needs: without them Chromium keeps trying to reach its services.
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The Chromium to drive: ``PYWSSERVER_CHROMIUM``, else the first of the usual names on the PATH."""
    configured = os.environ.get("PYWSSERVER_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable(reason: str) -> None:
    """Skip, with how to install what is missing; in CI, where the browser must be there, fail."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(f"{reason}: {HOW_TO_INSTALL}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; each test opens its own context (its own tabs, cookies)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed")
    executable = find_chromium()
    if executable is None:
        configured = os.environ.get("PYWSSERVER_CHROMIUM")
        unavailable(f"PYWSSERVER_CHROMIUM={configured!r} is not executable" if configured else "no Chromium found")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            chromium_sandbox=False,  # --no-sandbox: CI runs as root
            args=CHROMIUM_FLAGS,
            timeout=TIMEOUT * 1000,
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``PYWSSERVER_ARTIFACTS`` when set, else the test's temporary directory."""
    configured = os.environ.get("PYWSSERVER_ARTIFACTS")
    if not configured:
        return tmp_path
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: A log line that says something went wrong. The loop watchdog's report is not one: it says the machine
#: (loaded by other tests) stalled the server's event loop, which is no fault of the page or the server.
TROUBLE = re.compile(
    r"^(WARNING|ERROR|CRITICAL)\b(?! \[\d+\] pywsserver\.watchdog:)|^Traceback|\bpywsserver\.bad_input\b"
)


class ChatServer:
    """``examples/chat.py`` as a process of its own; its log (stderr) collected line by line."""

    def __init__(self, backend: str, port: int = 0, options: tuple[str, ...] = (), processes: int = 1) -> None:
        self.backend = backend
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, str(CHAT), "--port", str(port), "--backend", backend, *options],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="backslashreplace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:  # each process says where it listens
            listening = self.wait_for_lines(r"listening on 127\.0\.0\.1:(\d+)", processes)
        except BaseException:
            self.stop()
            raise
        self.port = int(listening[0].group(1))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting for it at most ``timeout`` seconds."""
        return self.wait_for_lines(pattern, 1, timeout)[0]

    def wait_for_lines(self, pattern: str, count: int, timeout: float = TIMEOUT) -> list[re.Match[str]]:
        """The first ``count`` log lines matching ``pattern``, waiting for them at most ``timeout`` seconds."""
        compiled = re.compile(pattern)
        with self._changed:
            found: list[re.Match[str]] = []

            def seen() -> bool:
                found[:] = [m for m in map(compiled.search, self.lines) if m][:count]
                return len(found) == count or not self._reader.is_alive()

            self._changed.wait_for(seen, timeout)
            if len(found) < count:
                raise AssertionError(
                    f"{len(found)} of {count} log lines matching {pattern!r} within {timeout} s; the log:\n{self.log}"
                )
            return found

    def stop(self) -> int:
        """Stop the server as Ctrl+C does, and return its exit code (killed if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return self.process.returncode


@pytest.fixture(params=["asyncio", "trio"])
def server_backend(request: pytest.FixtureRequest) -> str:
    """The anyio backend the chat server process runs on."""
    return str(request.param)


@pytest.fixture
def servers() -> Iterator[list[ChatServer]]:
    """The chat servers a test starts (append to the list); whatever is still running is stopped at the end."""
    started: list[ChatServer] = []
    yield started
    for server in started:
        server.stop()


def open_chat(context: Any, port: int, name: str) -> Any:
    """A new tab on the chat page as ``name``, once its state says connected."""
    from playwright.sync_api import expect

    page = context.new_page()
    page.set_default_timeout(TIMEOUT * 1000)
    page.goto(f"http://127.0.0.1:{port}/?name={name}")
    expect(page.locator("#state")).to_have_attribute("data-state", "connected", timeout=TIMEOUT * 1000)
    return page


def say(page: Any, text: str) -> None:
    """Type ``text`` in the page's input and press Enter, as a person would."""
    page.locator("#text").fill(text)
    page.locator("#text").press("Enter")


def test_two_tabs_chat_and_one_sees_the_other_leave(
    browser: Any, servers: list[ChatServer], server_backend: str, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    server = ChatServer(server_backend)
    servers.append(server)
    context = browser.new_context(viewport={"width": 800, "height": 600})
    try:
        ann = open_chat(context, server.port, "ann")
        expect(ann.locator("#whoami")).to_have_text("You are ann.")
        bob = open_chat(context, server.port, "bob")
        expect(ann.locator("#log .joined").last).to_have_text("bob joined (2 here)")
        expect(bob.locator("#log .joined")).to_have_text(["bob joined (2 here)"])

        # Chromium's own handshake: it offered permessage-deflate, and the server agreed.
        assert "permessage-deflate" in ann.evaluate("socket.extensions")
        # ... and its Origin header names the page's origin.
        server.wait_for_line(
            rf"'ann' joined from 127\.0\.0\.1:\d+, origin 'http://127\.0\.0\.1:{server.port}' \(1 here\)"
        )

        say(ann, "hello bob")
        expect(ann.locator("#log .said")).to_have_text(["ann: hello bob"])
        expect(bob.locator("#log .said")).to_have_text(["ann: hello bob"])
        expect(ann.locator("#text")).to_have_value("")
        bob.locator("#text").fill("hi ann <b>not bold</b>")  # text, never markup
        bob.locator("#send").click()
        for page in (ann, bob):
            expect(page.locator("#log .said")).to_have_text(["ann: hello bob", "bob: hi ann <b>not bold</b>"])
        assert ann.locator("#log b").count() == 0

        screenshot = artifacts / f"chat-{server_backend}.png"
        ann.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 0
        with capsys.disabled():
            print(f"\nscreenshot of the chat page after the exchange: {screenshot}")

        bob.close()  # closing the tab: Chromium closes the connection itself
        expect(ann.locator("#log .left")).to_have_text(["bob left (1 here)"])
        closed = server.wait_for_line(r"'bob' left: connection closed with (\d+)")
        assert closed.group(1) in ("1000", "1001")
        expect(ann.locator("#state")).to_have_attribute("data-state", "connected")
    finally:
        context.close()
    assert server.stop() == 0
    server.wait_for_line(r"'ann' left: connection closed with (1000|1001)")
    # Nothing went wrong, and the browser asked for nothing the server does not serve (no favicon request).
    trouble = TROUBLE
    problems = [line for line in server.lines if trouble.search(line)]
    assert not problems, server.log


def test_the_page_reconnects_when_the_server_restarts(
    browser: Any, servers: list[ChatServer], server_backend: str
) -> None:
    from playwright.sync_api import expect

    first = ChatServer(server_backend)
    servers.append(first)
    context = browser.new_context()
    try:
        page = open_chat(context, first.port, "ann")
        state = page.locator("#state")

        assert first.stop() == 0  # the server goes away: its workers close with 1001
        expect(state).to_have_attribute("data-state", "reconnecting")
        expect(page.locator("#log .notice").last).to_have_text("disconnected (1001), reconnecting")
        expect(page.locator("#send")).to_be_disabled()
        # The page keeps trying while nothing listens: its attempts are refused, and counted.
        page.wait_for_function("Number(document.getElementById('state').dataset.attempt) >= 2")
        expect(state).to_have_attribute("data-state", "reconnecting")

        second = ChatServer(server_backend, port=first.port)
        servers.append(second)
        expect(state).to_have_attribute("data-state", "connected")
        second.wait_for_line(r"'ann' joined from 127\.0\.0\.1:\d+, origin '[^']+' \(1 here\)")
        say(page, "back again")
        expect(page.locator("#log .said")).to_have_text(["ann: back again"])
    finally:
        context.close()
    assert second.stop() == 0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free port (skipped where it is not installed, failing in CI)."""
    yield from running_redis(tmp_path)


def test_two_pages_on_two_server_processes_chat_through_the_cluster(
    browser: Any, servers: list[ChatServer], redis_server: RedisServer
) -> None:
    from playwright.sync_api import expect

    # Two chat processes, each a node of one cluster (asyncio: the cluster's Redis client runs on it
    # alone), each with its own port: the two pages are served by different processes for sure.
    for _ in range(2):
        servers.append(ChatServer("asyncio", options=("--cluster-url", redis_server.url)))
    first, second = servers
    context = browser.new_context()
    try:
        ann = open_chat(context, first.port, "ann")
        bob = open_chat(context, second.port, "bob")
        first.wait_for_line(r"'ann' joined from")
        second.wait_for_line(r"'bob' joined from")
        expect(ann.locator("#log .joined")).to_have_text(["ann joined", "bob joined"])  # no count in a cluster

        say(ann, "hello from the first process")
        # Order is kept per sender, not across senders on different nodes: bob answers once he has
        # ann's message, so both pages must show the two lines in this order.
        expect(bob.locator("#log .said")).to_have_text(["ann: hello from the first process"])
        say(bob, "hello from the second")
        for page in (ann, bob):
            expect(page.locator("#log .said")).to_have_text(
                ["ann: hello from the first process", "bob: hello from the second"]
            )

        bob.close()
        expect(ann.locator("#log .left")).to_have_text(["bob left"])
        second.wait_for_line(r"'bob' left: connection closed with (1000|1001)")
    finally:
        context.close()
    # The room has told the cluster that ann left before the node stops (a broadcast made while a node
    # stops finds its Redis link closed, and is logged as a warning).
    first.wait_for_line(r"'ann' left: connection closed with (1000|1001)")
    for server in servers:
        assert server.stop() == 0
    for server in servers:
        trouble = TROUBLE
        assert not [line for line in server.lines if trouble.search(line)], server.log


def test_the_chat_over_two_processes_of_one_server_in_a_cluster(
    browser: Any, servers: list[ChatServer], redis_server: RedisServer
) -> None:
    """``--processes 2 --cluster-url``: tabs opened until one lands on the other process, and they chat."""
    from playwright.sync_api import expect

    port = free_port()  # the processes share it (SO_REUSEPORT), so it is chosen before they start
    options = ("--processes", "2", "--cluster-url", redis_server.url)
    server = ChatServer("asyncio", port=port, options=options, processes=2)
    servers.append(server)
    joined = r"\[(\d+)\] chat: '{}' joined from"
    context = browser.new_context()
    try:
        ann = open_chat(context, port, "ann")
        ann_process = server.wait_for_line(joined.format("ann")).group(1)
        # The kernel spreads connections over the processes by their addresses: a new tab lands on the
        # other process half of the time. Tabs that land on ann's are closed again.
        bob = None
        for number in range(20):
            tab = open_chat(context, port, f"bob-{number}")
            if server.wait_for_line(joined.format(f"bob-{number}")).group(1) != ann_process:
                bob, name = tab, f"bob-{number}"
                break
            tab.close()
        assert bob is not None, f"20 tabs all served by process {ann_process}: {server.log}"

        say(ann, "hello from one process")
        expect(bob.locator("#log .said")).to_have_text(["ann: hello from one process"])
        say(bob, "hello from the other")
        expect(ann.locator("#log .said")).to_have_text(["ann: hello from one process", f"{name}: hello from the other"])
        bob.close()
        expect(ann.locator("#log .left").last).to_have_text(f"{name} left")
    finally:
        context.close()
    server.wait_for_line(r"'ann' left: connection closed with (1000|1001)")  # before the nodes stop, as above
    assert server.stop() == 0
    trouble = TROUBLE
    assert not [line for line in server.lines if trouble.search(line)], server.log
