"""The status-endpoint benchmark runs end to end (a few clients for a fraction of a second;
its rates are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_status.py"
SMALL = ["--clients", "4", "--seconds", "0.3", "--repeat", "1"]


def test_bench_status_loads_the_service_and_a_bare_fastapi_route_alike() -> None:
    # --no-target: a smoke run proves the script works, not how fast this machine is.
    result = subprocess.run(
        [sys.executable, str(BENCH), *SMALL, "--no-target"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "service status: GET /api/job/{id}/status, 4 keep-alive clients" in out, out
    assert "gembatch serve:" in out and "req/s" in out
    assert "bound: bare FastAPI route returning the same JSON as a constant" in out
    assert "target >= 0.5:" in out
