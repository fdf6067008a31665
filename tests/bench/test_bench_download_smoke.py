"""The download benchmark runs end to end (a few MiB; its timings are not checked here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_download.py"


@pytest.mark.skipif(
    shutil.which("curl") is None,
    reason="curl is not installed: bench_download.py times it as its bound (apt-get install curl)",
)
def test_bench_download_streams_and_verifies_the_file_and_prints_curl_as_its_bound() -> None:
    # --no-target: a smoke run proves the script works, not how fast this machine is.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--size-mib", "4", "--repeat", "1", "--no-target"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "download: one results file of 4 MiB (256 lines)" in out, out
    assert "bound: curl on the same file from the same emulator:" in out
    assert "throughput ratio" in out and "target >= 0.70:" in out
    assert "peak RSS of the download process:" in out and "target <= 100 MiB:" in out
