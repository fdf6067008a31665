"""Seed 002's API: AtomicJobManager, batch_to_dict, count_lines, convert_job_if_needed."""

from __future__ import annotations

import datetime
import enum
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.genai import types

from gembatch import batch_info
from gembatch.ledger import LedgerLockedError
from gembatch.ledger.jsonl import (
    AtomicJobManager,
    JsonlLedger,
    batch_to_dict,
    convert_job_if_needed,
    count_lines,
)

LEGACY = {
    "input_file": "in/legacy.jsonl",
    "job_name": "batches/legacy1",
    "uploaded_file_name": "files/up-legacy",
    "display_name": "batch-job-legacy",
    "created_at": "2025-07-13T01:01:38.807581",
    "completed_at": "2025-07-13T01:03:03.448724",
    "final_state": "JOB_STATE_SUCCEEDED",
    "duration_seconds": 84,
}


def current(n: int, **extra: object) -> dict:
    return {
        "input_file": f"in/{n}.jsonl",
        "count": 3,
        "uploaded_file_name": f"files/up{n}",
        "batch": {"name": f"batches/b{n}", "state": "JOB_STATE_PENDING"},
        **extra,
    }


def write_ledger(path: Path, records: list[dict]) -> bytes:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(data)
    return data


def test_batch_info_module_reexports_the_seed_names() -> None:
    assert batch_info.AtomicJobManager is AtomicJobManager
    assert batch_info.batch_to_dict is batch_to_dict
    assert batch_info.convert_job_if_needed is convert_job_if_needed
    assert batch_info.count_lines is count_lines
    assert callable(batch_info.get_batch_info)


def test_manager_writes_once_on_exit_for_many_changes(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    write_ledger(path, [current(1), current(2)])
    with AtomicJobManager(path) as manager:
        assert manager.add_job(current(3))
        assert manager.add_job(current(4))
        assert manager.update_job_by_batch_name(current(1, count=30))
        assert manager.bulk_update_jobs([current(2, count=20), current(9)]) == 1
        assert path.read_bytes().count(b"\n") == 2  # nothing written yet
        assert manager.writes == 0
    assert manager.writes == 1
    jobs = JsonlLedger(path).load().records
    assert [(j["input_file"], j["count"]) for j in jobs] == [
        ("in/1.jsonl", 30),
        ("in/2.jsonl", 20),
        ("in/3.jsonl", 3),
        ("in/4.jsonl", 3),
    ]


def test_manager_without_changes_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    data = write_ledger(path, [current(1)])
    with AtomicJobManager(path) as manager:
        assert manager.find_job_by_input_file("in/1.jsonl")["count"] == 3
        assert not manager.add_job(current(1, count=99))  # same input_file: refused
        assert not manager.update_job_by_batch_name(current(5))
    assert manager.writes == 0
    assert path.read_bytes() == data


def test_manager_saves_changes_even_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    write_ledger(path, [current(1)])
    with pytest.raises(KeyboardInterrupt), AtomicJobManager(path) as manager:
        manager.add_job(current(2))  # a batch that now exists remotely
        raise KeyboardInterrupt
    assert [j["input_file"] for j in JsonlLedger(path).load().records] == [
        "in/1.jsonl",
        "in/2.jsonl",
    ]
    with JsonlLedger(path, timeout=0).locked():  # and the lock was released
        pass


def test_read_only_manager_refuses_every_write_method(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    data = write_ledger(path, [current(1, count=0)])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.jsonl").write_text("a\nb\n")
    with AtomicJobManager(path, read_only=True) as manager:
        for call in (
            lambda: manager.add_job(current(2)),
            lambda: manager.update_job_by_batch_name(current(1)),
            lambda: manager.bulk_update_jobs([current(1)]),
        ):
            with pytest.raises(RuntimeError, match="read-only"):
                call()
        assert manager.was_converted()  # the count was added, in memory only
        assert manager.get_all_jobs()[0]["count"] == 2
    assert path.read_bytes() == data


def test_read_only_manager_holds_the_lock_only_for_the_read(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    write_ledger(path, [current(1)])
    with AtomicJobManager(path, read_only=True):
        assert JsonlLedger(path, timeout=0).add(current(2))  # not blocked
    with AtomicJobManager(path), pytest.raises(LedgerLockedError):  # write mode: held throughout
        JsonlLedger(path, timeout=0.1).add(current(3))


def test_manager_find_methods_and_get_all_jobs_copy(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    write_ledger(path, [current(1), LEGACY])
    with AtomicJobManager(path, read_only=True) as manager:
        assert manager.find_job_by_batch_name("batches/b1")["input_file"] == "in/1.jsonl"
        assert (
            manager.find_job_by_batch_name("batches/legacy1")["input_file"] == LEGACY["input_file"]
        )
        assert manager.find_job_by_input_file("./in/1.jsonl") is not None
        assert manager.find_job_by_input_file("in/none.jsonl") is None
        jobs = manager.get_all_jobs()
        jobs[0]["count"] = 1000
        assert manager.get_all_jobs()[0]["count"] == 3
        assert manager.file_exists(path) and not manager.file_exists(tmp_path / "nope")
        assert not manager.was_converted()  # no client: the legacy record could not be
        assert [p.line for p in manager.problems] == [2]
        assert "needs the Gemini API" in manager.problems[0].message


def test_manager_converts_legacy_records_offline_and_writes_them_back(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    write_ledger(path, [LEGACY, current(1)])
    with AtomicJobManager(path, offline=True) as manager:
        assert manager.was_converted()
    first = JsonlLedger(path).load().records[0]
    assert first["batch"] == {
        "name": "batches/legacy1",
        "display_name": "batch-job-legacy",
        "state": "JOB_STATE_SUCCEEDED",
        "create_time": "2025-07-13T01:01:38.807581",
        "end_time": "2025-07-13T01:03:03.448724",
    }
    assert first["converted_from"] == "v0.1.0-offline"
    assert first["uploaded_file_name"] == "files/up-legacy"
    assert first["duration_seconds"] == 84 and first["final_state"] == "JOB_STATE_SUCCEEDED"
    assert "job_name" not in first and "display_name" not in first
    assert first["id"].startswith("legacy-")  # the derived id is stored with the rewrite


def test_count_lines_counts_non_empty_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"b": 2}\r\n{"c": "\xff"}')
    assert count_lines(path) == 3


class PseudoState:
    name = "JOB_STATE_RUNNING"


class OtherEnum(enum.Enum):
    JOB_STATE_FAILED = 7


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (types.JobState.JOB_STATE_SUCCEEDED, "JOB_STATE_SUCCEEDED"),
        ("JOB_STATE_PENDING", "JOB_STATE_PENDING"),
        ("BATCH_STATE_RUNNING", "JOB_STATE_RUNNING"),
        (PseudoState(), "JOB_STATE_RUNNING"),
        (OtherEnum.JOB_STATE_FAILED, "JOB_STATE_FAILED"),
        (None, None),
    ],
)
def test_batch_to_dict_gives_the_state_name(state: object, expected: str | None) -> None:
    job = SimpleNamespace(name="batches/x", display_name="d", model="m", state=state, dest=None)
    assert batch_to_dict(job)["state"] == expected


def test_batch_to_dict_matches_the_seed_output_format() -> None:
    utc = datetime.UTC
    job = types.BatchJob(
        name="batches/abc",
        display_name="batch-job-batch_requests",
        model="models/gemini-2.5-flash-lite-preview-06-17",
        state=types.JobState.JOB_STATE_SUCCEEDED,
        create_time=datetime.datetime(2025, 7, 12, 16, 1, 38, 750979, tzinfo=utc),
        update_time=datetime.datetime(2025, 7, 12, 16, 3, 5, 823235, tzinfo=utc),
        end_time=datetime.datetime(2025, 7, 12, 16, 2, 35, 523435, tzinfo=utc),
        dest=types.BatchJobDestination(file_name="files/batch-abc"),
    )
    assert batch_to_dict(job) == {
        "name": "batches/abc",
        "display_name": "batch-job-batch_requests",
        "model": "models/gemini-2.5-flash-lite-preview-06-17",
        "state": "JOB_STATE_SUCCEEDED",
        "create_time": "2025-07-12T16:01:38.750979+00:00",
        "update_time": "2025-07-12T16:03:05.823235+00:00",
        "end_time": "2025-07-12T16:02:35.523435+00:00",
        "dest": {"file_name": "files/batch-abc"},
    }
    pending = batch_to_dict(types.BatchJob(name="batches/p", state="JOB_STATE_PENDING"))
    assert "end_time" not in pending and "dest" not in pending  # None values are left out
    failed = types.BatchJob(
        name="batches/f",
        state=types.JobState.JOB_STATE_FAILED,
        error=types.JobError(code=13, message="internal"),
    )
    assert batch_to_dict(failed)["error"] == {"code": 13, "message": "internal"}


def test_convert_returns_none_for_a_complete_current_record() -> None:
    assert convert_job_if_needed(None, current(1)) is None


def test_convert_adds_a_missing_count_right_after_input_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.jsonl").write_text("q1\nq2\n\nq3\n")
    record = current(1)
    del record["count"]
    converted = convert_job_if_needed(None, record, base_dir=tmp_path)
    assert converted == {**record, "count": 3}
    assert list(converted)[:2] == ["input_file", "count"]
    assert convert_job_if_needed(None, {**record, "count": 0}, base_dir=tmp_path)["count"] == 3


def test_convert_reports_a_missing_input_file_instead_of_failing(tmp_path: Path) -> None:
    record = current(1)
    del record["count"]
    problems: list[str] = []
    assert convert_job_if_needed(None, record, problems=problems, base_dir=tmp_path) is None
    assert len(problems) == 1 and "in/1.jsonl" in problems[0]


def test_convert_needs_a_client_for_a_legacy_record_and_says_so() -> None:
    problems: list[str] = []
    assert convert_job_if_needed(None, LEGACY, problems=problems) is None
    assert "GEMINI_API_KEY" in problems[0] and "batches/legacy1" in problems[0]
