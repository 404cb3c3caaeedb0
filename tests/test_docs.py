"""The documentation's Python examples compile, and the ones that end by themselves run as written."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pywsserver._options import parse_options

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [*DOCS, ROOT / "README.md"], ids=lambda p: p.name)
def test_every_python_block_compiles(path: Path) -> None:
    for number, code in enumerate(blocks(path)):
        compile(code, f"{path.name}[{number}]", "exec")


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Examples may configure logging, as users would; the tests after them get it back as it was."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)] + [logging.root]
    levels = {logger: logger.level for logger in loggers}
    handlers = list(logging.root.handlers)
    yield
    for logger, level in levels.items():
        logger.setLevel(level)
    logging.root.handlers[:] = handlers


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_examples_of_each_page_run_in_order(path: Path, logging_restored: None) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for number, code in enumerate(blocks(path)):
        exec(compile(code, f"{path.name}[{number}]", "exec"), namespace)


def test_the_documented_option_tree_is_valid_and_shows_the_defaults() -> None:
    (code,) = [b for b in blocks(ROOT / "docs" / "options.md") if "options = [" in b]
    namespace: dict[str, object] = {}
    exec(code, namespace)
    documented = parse_options(namespace["options"])
    defaults = parse_options(
        [("worker_options", [("protocol_modules", [("websocket", [("handler_module", "pywsserver.echo")])])])]
    )
    assert documented.port == defaults.port
    assert documented.host == defaults.host
    assert documented.max_connections == defaults.max_connections
    assert documented.drain_timeout == defaults.drain_timeout
    assert documented.worker.mailbox_size == defaults.worker.mailbox_size
    assert documented.worker.write_buffer_size == defaults.worker.write_buffer_size
    assert documented.tls_handshake_timeout == defaults.tls_handshake_timeout
    assert (documented.tls, documented.unix_path) == (defaults.tls, defaults.unix_path)
    assert (documented.reuse_port, documented.processes) == (defaults.reuse_port, defaults.processes)
    assert documented.worker.modules["http"].options == defaults.worker.modules["http"].options
    doc_ws, default_ws = documented.worker.modules["websocket"].options, defaults.worker.modules["websocket"].options
    fields = (
        "max_message_size",
        "close_timeout",
        "control_messages",
        "compression",
        "subprotocols",
        "allowed_origins",
        "ping_interval",
        "ping_timeout",
        "idle_timeout",
    )
    for name in fields:
        assert getattr(doc_ws, name) == getattr(default_ws, name), name


#: Pages whose ``print(...)  # text`` comments show exactly what the example prints.
PRINTING = ["first-server.md", "first-handler.md", "embedding.md"]


@pytest.mark.parametrize("name", PRINTING)
def test_the_printed_values_in_the_comments_are_what_the_examples_print(
    name: str, logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ROOT / "docs" / name
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    expected: list[str] = []
    for number, code in enumerate(blocks(path)):
        expected += re.findall(r"^\s*print\(.*\)\s+# (.+)$", code, re.MULTILINE)
        exec(compile(code, f"{path.name}[{number}]", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert expected
    for line in expected:
        assert line.strip() in printed
