"""The ledger benchmark runs end to end (tiny sizes; its figures are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_ledger.py"


def test_bench_ledger_runs_and_reports_one_write_against_its_bound() -> None:
    sizes = ["--jobs", "40", "--updates", "4", "--repeat", "2"]
    # A smoke run checks that the script works, not how fast: no target can be missed here.
    result = subprocess.run(
        [sys.executable, str(BENCH), *sizes, "--target", "3600"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "40 jobs" in result.stdout and "4 updated by one update_many call" in result.stdout
    assert ", 1 write;" in result.stdout
    assert "x bound" in result.stdout
