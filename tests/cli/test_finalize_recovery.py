"""A finalize that stopped before its ledger write (a kill, or another server finalizing
the same job at the same time) is finished by the next cycle, whatever it had done to the
files: a part already moved into the results file, a part linked or merged there, or
nothing yet.

Why: a results file is merged from verified parts, then the ledger records the merge. A
3-server test on PostgreSQL caught a job stuck `running` for ever after a kill between the
two: its only part had been renamed into the results file, and every later finalize
failed on the missing part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import gembatch, keys_of, ledger, request_file, results_of

FAST = {"clock": {"pending_seconds": 0.2, "running_seconds": 0.5}}


def _finished(emulator: Any, cwd: Path, tasks: int) -> tuple[dict[str, Any], bytes]:
    """A job of 4 requests in `tasks` tasks, run to the end; its record and results."""
    request_file(cwd / "a.jsonl", 4)
    split = ["--max-task-requests", str(4 // tasks)]
    done = gembatch(emulator, cwd, "run", "a.jsonl", "--interval", "0.2", *split)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = ledger(cwd)
    assert record["status"] == "completed" and len(record["tasks"]) == tasks
    return record, (cwd / "results" / "a.jsonl").read_bytes()


def _as_if_finalize_stopped(cwd: Path, record: dict[str, Any]) -> None:
    """The ledger as the finalize found it: every task done, nothing merged, job running."""
    record = {**record, "status": "running", "completed_at": None, "final_state": None}
    record["duration_seconds"] = None
    for task in record["tasks"]:
        task.pop("merged", None)
    (cwd / "job-info.jsonl").write_text(json.dumps(record) + "\n")


def _write_parts(record: dict[str, Any], results: bytes) -> list[Path]:
    """Each task's verified part, as its download left it (the results lines of its keys)."""
    lines = results.splitlines(keepends=True)
    by_key = {json.loads(line)["key"]: line for line in lines}
    keys = sorted(by_key)
    paths = []
    per_task = len(keys) // len(record["tasks"])
    for n, task in enumerate(record["tasks"]):
        path = Path(task["part_file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(by_key[k] for k in keys[n * per_task : (n + 1) * per_task]))
        paths.append(path)
    return paths


def _finishes_with_the_same_results(emulator: Any, cwd: Path, results: bytes) -> None:
    polled = gembatch(emulator, cwd, "poll", "--once")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert "finalize" not in polled.stdout + polled.stderr, polled.stdout + polled.stderr
    (record,) = ledger(cwd)
    assert record["status"] == "completed", record
    assert record["final_state"] == "JOB_STATE_SUCCEEDED" and record["completed_at"]
    assert all(task.get("merged") for task in record["tasks"])
    by_key = results_of(cwd / "a.jsonl")  # one line per key
    assert sorted(by_key) == sorted(keys_of(cwd / "a.jsonl"))
    expected = {json.loads(line)["key"]: json.loads(line) for line in results.splitlines()}
    assert by_key == expected
    assert not list((cwd / "results" / ".gembatch").glob("*")), "parts left behind"


@pytest.mark.parametrize("tasks", [1, 2])
def test_parts_already_in_the_results_file_and_gone(
    emulator_factory: Any, tmp_path: Path, tasks: int
) -> None:
    # One task: an older gembatch renamed the part into place. Two: merged, parts removed.
    emulator = emulator_factory(FAST)
    record, results = _finished(emulator, tmp_path, tasks)
    _as_if_finalize_stopped(tmp_path, record)
    _finishes_with_the_same_results(emulator, tmp_path, results)


@pytest.mark.parametrize("tasks", [1, 2])
def test_parts_still_there_and_the_results_file_already_written(
    emulator_factory: Any, tmp_path: Path, tasks: int
) -> None:
    # The results file was linked or merged from the parts; the parts are still there.
    emulator = emulator_factory(FAST)
    record, results = _finished(emulator, tmp_path, tasks)
    _as_if_finalize_stopped(tmp_path, record)
    _write_parts(record, results)
    _finishes_with_the_same_results(emulator, tmp_path, results)


def test_parts_there_and_no_results_file_yet(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(FAST)
    record, results = _finished(emulator, tmp_path, 2)
    _as_if_finalize_stopped(tmp_path, record)
    _write_parts(record, results)
    (tmp_path / "results" / "a.jsonl").unlink()
    _finishes_with_the_same_results(emulator, tmp_path, results)


def test_one_part_missing_and_the_other_there(emulator_factory: Any, tmp_path: Path) -> None:
    # Two finalizes at once: one merged and removed the first part, then stopped.
    emulator = emulator_factory(FAST)
    record, results = _finished(emulator, tmp_path, 2)
    _as_if_finalize_stopped(tmp_path, record)
    first, _ = _write_parts(record, results)
    first.unlink()
    _finishes_with_the_same_results(emulator, tmp_path, results)
