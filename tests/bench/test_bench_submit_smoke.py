"""The submit benchmark runs end to end (three small files; timings are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_submit.py"
SMALL = ["--files", "3", "--file-mb", "0.2", "--repeat", "1"]


def test_bench_submit_submits_every_file_and_prints_the_bare_upload_bound() -> None:
    # --no-target: a smoke run proves the script works, not how fast this machine is.
    result = subprocess.run(
        [sys.executable, str(BENCH), *SMALL, "--no-target"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "submit: 3 files x 0.2 MB (1 MB), 4 uploads in flight" in out, out
    assert "gembatch submit:" in out
    assert "bound: bare Remote loop, uploads + creates, same concurrency, no validation:" in out
    assert "uploads alone (no creates):" in out
    assert "target <= 1.3:" in out
    assert "validation alone" in out
