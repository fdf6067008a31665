"""Usage errors and option checks: a short message and exit code 2, never a traceback,
and nothing created or uploaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import gembatch, ledger, request_file

USAGE_ERRORS = [
    ([], "Commands"),  # no command: the help
    (["submit"], "Missing argument 'FILE'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["--local"], "Missing command"),
    (["poll", "--interval", "abc"], "'--interval'"),
    (["submit", "--priority", "x", "a.jsonl"], "'--priority'"),
    (["status", "--json", "--bogus"], "No such option: --bogus"),
]


@pytest.mark.parametrize(
    "args, message", USAGE_ERRORS, ids=[" ".join(a) or "no-args" for a, _ in USAGE_ERRORS]
)
def test_usage_errors_are_a_short_message_not_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = gembatch(None, tmp_path, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert message in output
    assert len(output.splitlines()) < 60


OUT_OF_RANGE = [
    (["poll", "--interval", "-1"], "--interval"),
    (["poll", "--interval", "0"], "--interval"),
    (["poll", "--concurrency", "0"], "--concurrency"),
    (["poll", "--max-live-batches", "-1"], "--max-live-batches"),
    (["run", "--interval", "-5", "a.jsonl"], "--interval"),
    (["submit", "--max-live-batches", "-3", "a.jsonl"], "--max-live-batches"),
    (["submit", "--max-task-requests", "0", "a.jsonl"], "--max-task-requests"),
    (["submit", "--max-task-bytes", "-1", "a.jsonl"], "--max-task-bytes"),
    (["submit", "--max-parallel-tasks", "0", "a.jsonl"], "--max-parallel-tasks"),
    (["submit", "--max-attempts", "0", "a.jsonl"], "--max-attempts"),
    (["submit", "--retry-interval", "-2", "a.jsonl"], "--retry-interval"),
    (["submit", "--retry-on", "BOGUS", "a.jsonl"], "--retry-on BOGUS: unknown error class"),
]


@pytest.mark.parametrize("args, option", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_option_values_out_of_range_are_refused_before_any_work(
    emulator: Any, tmp_path: Path, args: list[str], option: str
) -> None:
    request_file(tmp_path / "a.jsonl", 2)
    done = gembatch(emulator, tmp_path, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert option in output and "Traceback" not in output
    assert "retry_on_errors" not in output  # the CLI's own option names
    stats = emulator.stats()
    assert stats["upload_starts"] == 0 and stats["calls"] == {}
    assert ledger(tmp_path) == []


def test_help_shows_flags_without_a_value(tmp_path: Path) -> None:
    done = gembatch(None, tmp_path, "--help")
    assert done.returncode == 0
    (local,) = [line for line in done.stdout.splitlines() if "│ --local " in line]
    assert "<bool>" not in local
    submit = gembatch(None, tmp_path, "submit", "--help").stdout
    assert not [line for line in submit.splitlines() if "--force" in line and "<bool>" in line]


@pytest.mark.parametrize("local", [False, True])
def test_a_ledger_in_a_missing_directory_is_refused_and_not_created(
    emulator: Any, tmp_path: Path, local: bool
) -> None:
    request_file(tmp_path / "a.jsonl", 2)
    missing = tmp_path / "nonexist" / "x.jsonl"
    flags = ["--local"] if local else []
    done = gembatch(emulator, tmp_path, "--job-info", str(missing), *flags, "submit", "a.jsonl")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{missing.parent} does not exist" in done.stderr and "Traceback" not in done.stderr
    assert not missing.parent.exists()
    assert emulator.stats()["upload_starts"] == 0
    polled = gembatch(emulator, tmp_path, "--job-info", str(missing), "poll", "--once")
    assert polled.returncode == 2 and "does not exist" in polled.stderr
    assert not missing.parent.exists()
