"""The poll-cycle benchmark runs end to end (tiny sizes; its timings are not checked here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_poll.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=180
    )


def test_bench_poll_polls_every_job_with_one_ledger_write_and_prints_its_bound() -> None:
    # --no-target: a smoke run proves the script works, not how fast this machine is.
    result = _run(
        "--jobs", "20", "--concurrency", "8", "--latency-ms", "5", "--repeat", "1", "--no-target"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "poll cycle: 20 active jobs, concurrency 8" in out
    assert re.search(r"for 20 batches.get \(0 errors, [01] ledger writes?\)", out), out
    assert "floor: 5 ms x ceil(20 / 8) = 0.015 s; ratio" in out
    assert "target: <= 1.25 x floor = 0.019 s:" in out
    assert "split: network" in out
    assert "sequential polling would take 20 x 5 ms = 0.1 s" in out
    assert "whole engine.cycle():" in out


def test_bench_poll_emulator_only_reports_requests_per_second() -> None:
    result = _run("--emulator-only", "--jobs", "5", "--clients", "4", "--seconds", "0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    for endpoint in ("batches.create", "batches.get", "batches.list", "files.get", "files.list"):
        assert f"{endpoint}:" in result.stdout
    assert result.stdout.count("(0 errors;") == 4
