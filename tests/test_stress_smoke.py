"""The stress script (``benchmarks/stress.py``) runs, at a small scale; its figures are in docs/reliability.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="the stress script reads /proc (Linux)")
def test_the_stress_script_runs_at_a_small_scale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress.py"), "--scale", "0.01", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| recovery | fresh client served | True |" in result.stdout
    assert "| after | server alive | True |" in result.stdout


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="the stress script reads /proc (Linux)")
def test_the_tls_rounds_run_at_a_small_scale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stress.py"), "--only", "tls", "--scale", "0.02", "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| tls (round 2) | TLS connections upgraded then reset | 20 of 20 |" in result.stdout
    assert "| after | fresh TLS client served | True |" in result.stdout
