"""`gembatch ... | head -1`: when the reader goes away, the command ends quietly (exit 0 or
141, nothing on stderr), whichever layer was writing (Typer's help, a Rich table, print,
a command's own writer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.helpers import request_file

pytestmark = pytest.mark.process


def ledger_of_many_jobs(path: Path, n: int) -> Path:
    """A job-info.jsonl of `n` finished jobs, in the original gembatch's format."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            batch = {
                "name": f"batches/b{i}",
                "display_name": f"job-{i}",
                "model": "models/gemini-2.5-flash-lite",
                "state": "JOB_STATE_SUCCEEDED",
                "create_time": "2025-01-01T00:00:00Z",
                "update_time": "2025-01-01T00:01:00Z",
                "end_time": "2025-01-01T00:01:00Z",
                "dest": {"file_name": f"files/out-{i}"},
            }
            record = {
                "input_file": f"in/{i}.jsonl",
                "count": 3,
                "uploaded_file_name": f"files/in-{i}",
                "batch": batch,
            }
            handle.write(json.dumps(record) + "\n")
    return path


def into_a_pipe_with_no_reader(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `gembatch ARGS` with stdout a pipe whose reader is gone, as it is once `head -1`
    has its line: every write to stdout then fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("GEMINI_API_KEY", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "gembatch", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["submit", "--help"],
        ["status"],
        ["status", "--json"],
        ["results", "req.jsonl"],
        ["info"],
    ],
    ids=lambda args: " ".join(args),
)
def test_a_reader_that_went_away_ends_the_command_quietly(tmp_path: Path, args: list[str]) -> None:
    ledger_of_many_jobs(tmp_path / "job-info.jsonl", 2000)
    request_file(tmp_path / "req.jsonl", 5000)  # no results yet: every key is "missing"

    done = into_a_pipe_with_no_reader(tmp_path, *args)

    assert done.stderr == "", done.stderr  # no "Broken pipe", no traceback, no summary
    assert done.returncode in (0, 141)
