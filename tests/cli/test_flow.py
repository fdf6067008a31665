"""The whole flow through the real `gembatch` command and the real SDK, against an
emulator process: submit, poll, run, status, results, cleanup."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.cli.helpers import (
    ActiveSampler,
    gembatch,
    keys_of,
    ledger,
    request_file,
    results_of,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = {"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}}


def test_run_on_the_bundled_examples_writes_one_line_per_key(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    names = sorted(p.name for p in EXAMPLES.glob("*.jsonl"))
    for name in names:
        shutil.copy(EXAMPLES / name, tmp_path / name)

    done = gembatch(emulator, tmp_path, "run", "--interval", "0.3", *names)

    assert done.returncode == 0, done.stderr + done.stdout
    for name in names:
        by_key = results_of(tmp_path / name)
        assert sorted(by_key) == sorted(keys_of(tmp_path / name))
        assert all("response" in line for line in by_key.values())
    stats = emulator.stats()
    assert len(stats["creates_by_display_name"]) == len(names)
    assert set(stats["creates_by_display_name"].values()) == {1}
    # after a verified download, the input, the batch and the output were deleted
    assert stats["batches_deleted"] == len(names)
    assert stats["files"] == 0
    records = ledger(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * len(names)
    for record in records:
        assert record["final_state"] == "JOB_STATE_SUCCEEDED"
        assert record["completed_at"] and record["duration_seconds"] is not None
        assert record["batch"]["state"] == "JOB_STATE_SUCCEEDED"  # the seed-002 fields
    assert not list((tmp_path / "results").glob("*.tmp"))


def test_thirty_files_at_once_never_exceed_the_live_batch_limit(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 0.8}})
    files = [request_file(tmp_path / f"f{i:02d}.jsonl", 4, prefix=f"f{i}-").name
             for i in range(30)]  # fmt: skip

    with ActiveSampler(emulator) as sampler:
        submitted = gembatch(emulator, tmp_path, "submit", "--max-live-batches", "10", *files)
        assert submitted.returncode == 0, submitted.stderr
        lines = submitted.stdout.splitlines()
        assert [line.split("]")[0] + "]" for line in lines] == [f"[{i}/30]" for i in range(1, 31)]
        assert sum("submitted batches/" in line for line in lines) == 10
        assert sum("queued" in line for line in lines) == 20
        polled = gembatch(
            emulator, tmp_path, "poll", "--interval", "0.2", "--max-live-batches", "10"
        )
    assert polled.returncode == 0, polled.stderr + polled.stdout
    assert sampler.peak <= 10
    for name in files:
        assert sorted(results_of(tmp_path / name)) == sorted(keys_of(tmp_path / name))
    stats = emulator.stats()
    assert stats["batches_created"] == 30
    assert set(stats["creates_by_display_name"].values()) == {1}


def test_submitting_the_same_input_twice_is_skipped_unless_forced(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    request_file(tmp_path / "a.jsonl", 3)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    again = gembatch(emulator, tmp_path, "submit", "./a.jsonl")  # another spelling
    assert again.returncode == 0
    assert "skip: already submitted as job" in again.stdout
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "copy" / "a.jsonl")
    same_content = gembatch(emulator, tmp_path, "submit", "copy/a.jsonl")
    assert "skip" in same_content.stdout
    assert emulator.stats()["batches_created"] == 1
    forced = gembatch(emulator, tmp_path, "submit", "--force", "copy/a.jsonl")
    assert forced.returncode == 0 and "submitted" in forced.stdout
    assert emulator.stats()["batches_created"] == 2


def test_dry_run_uploads_nothing_and_needs_no_key(emulator: Any, tmp_path: Path) -> None:
    request_file(tmp_path / "a.jsonl", 50)
    done = gembatch(None, tmp_path, "submit", "--dry-run", "--max-task-requests", "20", "a.jsonl")
    assert done.returncode == 0, done.stderr
    assert "50 requests" in done.stdout and "3 tasks" in done.stdout
    assert "nothing was uploaded" in done.stdout
    assert "model gemini-2.5-flash-lite: not checked (GEMINI_API_KEY is not set)" in done.stdout
    assert not (tmp_path / "job-info.jsonl").exists()
    # with a key the model is checked; offline the dry run still works
    checked = gembatch(emulator, tmp_path, "submit", "--dry-run", "a.jsonl")
    assert checked.returncode == 0 and "model gemini-2.5-flash-lite: available" in checked.stdout
    nowhere = {"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": "http://127.0.0.1:9"}
    offline = gembatch(None, tmp_path, "submit", "--dry-run", "a.jsonl", env=nowhere)
    assert offline.returncode == 0, offline.stderr
    assert "not checked (ConnectError" in offline.stdout
    assert emulator.stats()["upload_starts"] == 0


def test_a_large_input_is_split_into_tasks_and_merged_into_one_results_file(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    request_file(tmp_path / "big.jsonl", 50)
    done = gembatch(
        emulator, tmp_path, "run", "--interval", "0.2", "--max-task-requests", "15", "big.jsonl"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert emulator.stats()["batches_created"] == 4
    by_key = results_of(tmp_path / "big.jsonl")
    assert sorted(by_key) == sorted(keys_of(tmp_path / "big.jsonl"))
    (record,) = ledger(tmp_path)
    assert [t["input"]["count"] for t in record["tasks"]] == [15, 15, 15, 5]
    assert not list((tmp_path / "results" / ".gembatch").glob("*"))  # parts merged away


def test_status_results_and_cleanup_commands(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(FAST)
    path = tmp_path / "mixed.jsonl"
    request_file(path, 5)
    with open(path, "a") as handle:
        handle.write(
            '{"key": "bad", "request": {"contents": [{"parts": [{"text": '
            '"[[emulator:error=3]]"}]}]}}\n'
        )
    assert gembatch(emulator, tmp_path, "run", "--interval", "0.2", "mixed.jsonl").returncode == 0

    status = gembatch(emulator, tmp_path, "status", "--json")
    assert status.returncode == 0
    import json

    (job,) = json.loads(status.stdout)
    assert job["status"] == "completed"
    assert job["requests"] == {"total": 6, "succeeded": 5, "failed": 1, "pending": 0}

    joined = gembatch(emulator, tmp_path, "results", "mixed.jsonl")
    assert joined.returncode == 1  # one key failed
    rows = [json.loads(line) for line in joined.stdout.splitlines()]
    assert [r["key"] for r in rows] == keys_of(path)  # input order
    assert rows[-1]["status"] == "failed" and rows[-1]["error"]["code"] == 3
    assert "5 of 6 succeeded, 1 failed (bad)" in joined.stderr
    csv = gembatch(emulator, tmp_path, "results", "mixed.jsonl", "--format", "csv")
    assert csv.stdout.splitlines()[0].startswith("key,status,text")
    saved = gembatch(emulator, tmp_path, "results", "mixed.jsonl", "-o", "joined.jsonl")
    assert saved.returncode == 1 and saved.stdout == ""
    assert (tmp_path / "joined.jsonl").read_text() == joined.stdout

    table = gembatch(emulator, tmp_path, "status")
    assert "mixed.jsonl" in table.stdout and "Success" in table.stdout
    nothing = gembatch(emulator, tmp_path, "cleanup", "-y")
    assert nothing.returncode == 0 and "nothing to clean up" in nothing.stdout


def test_results_of_a_file_that_is_not_a_request_file_names_its_lines(tmp_path: Path) -> None:
    (tmp_path / "notes.jsonl").write_text('hello\n{"key": 1}\n')
    (tmp_path / "keep.jsonl").write_text("earlier output\n")
    joined = gembatch(None, tmp_path, "results", "notes.jsonl", "-o", "keep.jsonl")
    assert joined.returncode == 2, joined.stderr
    assert "Traceback" not in joined.stderr
    assert "notes.jsonl is not a request file" in joined.stderr
    assert "notes.jsonl:1: invalid JSON" in joined.stderr
    assert 'notes.jsonl:2: "key" must be a string' in joined.stderr
    # The output file is written all or nothing: what it held before is still there.
    assert (tmp_path / "keep.jsonl").read_text() == "earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "keep" in p.name) == ["keep.jsonl"]
