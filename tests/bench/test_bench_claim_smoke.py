"""The claim benchmark runs end to end on SQLite and, when it is reachable, PostgreSQL (a
few hundred jobs; its rates are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_claim.py"


def test_bench_claim_claims_every_job_within_the_limit_on_both_databases() -> None:
    # --target 0.001: a smoke run proves the script works, not how fast this machine is.
    small = ["--jobs", "300", "--workers", "2", "--limit", "20", "--target", "0.001"]
    result = subprocess.run(
        [sys.executable, str(BENCH), *small], capture_output=True, text=True, timeout=240
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "claim throughput: 300 queued jobs, 2 processes, limit 20" in out, out
    assert "SQLite: 300 claims by 2 processes" in out, out
    assert out.count("global limit 20: most busy tasks seen") >= 1
    assert "EXCEEDED" not in out and "MISSED" not in out
    assert "bound, same run: one single-row write transaction" in out
    if os.environ.get("GEMBATCH_REQUIRE_POSTGRES") == "1" or "PostgreSQL: skipped" not in out:
        assert "PostgreSQL: 300 claims by 2 processes" in out, out
