"""The SSE fan-out benchmark runs end to end (20 clients, two events; latencies are not
checked here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_sse.py"
SMALL = ["--clients", "20", "--processes", "2", "--events", "2"]
FAST = ["--poll-interval", "0.5", "--requests", "400"]


def test_bench_sse_times_every_event_at_every_client() -> None:
    # --no-target: a smoke run proves the script works, not how fast this machine is.
    result = subprocess.run(
        [sys.executable, str(BENCH), *SMALL, *FAST, "--no-target"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SSE fan-out: 20 clients on one job (2 client processes)" in out, out
    # Every event reached every client: 2 events x 20 clients, and 2 x 1 for the bound.
    assert re.search(r"20 clients: p50 \d+ ms, p99 \d+ ms, max \d+ ms over 40 deliveries", out)
    assert re.search(r"1 client: p50 \d+ ms, p99 \d+ ms, max \d+ ms over 2 deliveries", out)
    assert "target <= 250 ms:" in out
