"""The start-up benchmark runs end to end (a few pairs on a small ledger; its ratios are
not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_startup.py"

pytestmark = pytest.mark.process


def test_bench_startup_times_version_and_status_against_bare_python() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "50", "--repeat", "1", "--no-target"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "gembatch --version:" in out and "gembatch status (50 jobs, to a pipe):" in out, out
    assert out.count("bound: python -c pass") == 2
    assert "target <= 3.0" in out and "target <= 4.0" in out
