"""Records name their files relative to the service's data directory.

The rules of `gembatch.ledger.paths` (pure), and the SQL ledger that applies them: what
it stores is relative, what it hands out is resolved against the data directory it was
given, so the same database opened with another data directory (the site moved) finds
its files there.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from gembatch.engine import reducers
from gembatch.jobs import RetryConfig
from gembatch.ledger.paths import DataDir, relative_to_old_root
from gembatch.ledger.sql import SqlLedger


def service_record(job_id: str, root: str, result_root: str | None = None) -> dict[str, Any]:
    """A job as the service makes it: input `<root>/inputs/<id>.jsonl`, results in
    `<result_root or root>/results/`, one task that failed with a message naming its input."""
    results = result_root if result_root is not None else root
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"inline-{job_id}.jsonl",
        input_path=f"{root}/inputs/{job_id}.jsonl",
        sha256="0" * 64,
        size_bytes=10,
        count=2,
        plans=[(0, None, 2)],
        model="models/gemini-2.5-flash-lite",
        priority=0,
        retry_config=RetryConfig(),
        max_parallel_tasks=None,
        result_file=f"{results}/results/{job_id}.jsonl",
        now=time.time(),
    )
    record = job.to_record()
    record["tasks"][0]["part_file"] = f"{results}/results/.gembatch/{job_id}.t0a1.jsonl"
    record["error"] = {
        "code": "INPUT_MISSING",
        "class": "LOCAL_IO",
        "message": f"the input file {root}/inputs/{job_id}.jsonl is missing",
    }
    record["tasks"][0]["error"] = dict(record["error"])
    return record


def paths_of(record: dict[str, Any]) -> list[str]:
    task = record["tasks"][0]
    return [record["input_path"], record["result_file"], task["input"]["path"], task["part_file"]]


def test_paths_inside_the_data_directory_are_stored_relative_and_resolved_back(
    tmp_path: Path,
) -> None:
    data = DataDir.of(tmp_path / "data")
    record = service_record("j1", str(tmp_path / "data"))
    before = copy.deepcopy(record)
    stored = data.stored(record)
    assert paths_of(stored) == [
        "inputs/j1.jsonl",
        "results/j1.jsonl",
        "inputs/j1.jsonl",
        "results/.gembatch/j1.t0a1.jsonl",
    ]
    assert stored["error"]["message"] == "the input file inputs/j1.jsonl is missing"
    assert stored["tasks"][0]["error"]["message"] == stored["error"]["message"]
    assert str(tmp_path) not in json.dumps(stored)
    assert paths_of(data.resolved(stored)) == paths_of(record)
    # Resolved against where the data directory is now: the site moved.
    moved = DataDir.of(tmp_path / "elsewhere")
    assert paths_of(moved.resolved(stored))[0] == str(tmp_path / "elsewhere/inputs/j1.jsonl")
    assert record == before, "the record given is not changed"


def test_paths_outside_the_data_directory_stay_as_they_are(tmp_path: Path) -> None:
    data = DataDir.of(tmp_path / "data")
    # A sibling whose name starts with the data directory's is not inside it.
    record = service_record("j2", str(tmp_path / "data2"))
    stored = data.stored(record)
    assert paths_of(stored) == paths_of(record)
    assert stored["error"] == record["error"]


def test_a_data_directory_given_through_a_symlink_or_relative_path_is_the_same(
    tmp_path: Path, monkeypatch: Any
) -> None:
    (tmp_path / "disk" / "data").mkdir(parents=True)
    (tmp_path / "data").symlink_to(tmp_path / "disk" / "data")
    monkeypatch.chdir(tmp_path)
    data = DataDir.of("data")  # as `gembatch serve --data-dir data` gives it
    # Inputs are recorded resolved (through the symlink), results as given (relative).
    record = service_record("j3", str(tmp_path / "disk" / "data"), result_root="data")
    stored = data.stored(record)
    assert paths_of(stored)[:2] == ["inputs/j3.jsonl", "results/j3.jsonl"]
    assert data.resolved(stored)["result_file"] == str(tmp_path / "data/results/j3.jsonl")


def test_the_data_directory_alone_in_a_message_is_named_as_such(tmp_path: Path) -> None:
    data = DataDir.of(tmp_path / "data")
    record = {"id": "j4", "message": f"no space left on the device under {tmp_path / 'data'}"}
    assert data.stored(record)["message"] == "no space left on the device under the data directory"


def test_old_records_become_relative_to_the_data_directory_their_input_names() -> None:
    record = service_record("j5", "/srv/site/gembatch-data", result_root="gembatch-data")
    tasks = record.pop("tasks")
    record["tasks"] = []  # as the SQL ledger keeps a job: tasks in their own rows
    converted = relative_to_old_root(record, tasks)
    assert converted is not None
    new_record, new_tasks = converted
    assert paths_of({**new_record, "tasks": new_tasks}) == [
        "inputs/j5.jsonl",
        "results/j5.jsonl",
        "inputs/j5.jsonl",
        "results/.gembatch/j5.t0a1.jsonl",
    ]
    assert new_record["error"]["message"] == "the input file inputs/j5.jsonl is missing"
    assert new_tasks[0]["error"]["message"] == new_record["error"]["message"]
    assert relative_to_old_root(new_record, new_tasks) is None  # converted once


def test_records_not_in_the_service_layout_are_left_alone() -> None:
    # The CLI's kind of record: the input anywhere, results beside it.
    cli = service_record("j6", "/home/me/batch")
    cli["input_path"] = "/home/me/batch/in.jsonl"
    assert relative_to_old_root(cli, cli["tasks"]) is None
    # A results path relative to some other directory is not guessed at.
    odd = service_record("j7", "/srv/data", result_root="../elsewhere")
    converted = relative_to_old_root(odd, odd["tasks"])
    assert converted is not None
    assert converted[0]["input_path"] == "inputs/j7.jsonl"
    assert converted[0]["result_file"] == "../elsewhere/results/j7.jsonl"


def test_the_sql_ledger_stores_relative_paths_and_hands_out_real_ones(tmp_path: Path) -> None:
    db = tmp_path / "gembatch.db"
    data = tmp_path / "data"
    url = f"sqlite:///{db}"
    with SqlLedger(url, data_dir=data) as ledger:
        ledger.add_many([service_record("j8", str(data))])
        assert paths_of(ledger.get("j8"))[0] == str(data / "inputs/j8.jsonl")  # type: ignore[arg-type]
        seen: list[str] = []

        def change(record: dict[str, Any]) -> dict[str, Any]:
            seen.append(record["result_file"])
            part = f"{data}/results/.gembatch/j8.t0a2.jsonl"
            record["tasks"][0]["part_file"] = part
            return record

        result = ledger.apply({"j8": change})
        assert seen == [str(data / "results/j8.jsonl")]  # changes work on real paths
        assert result.records["j8"]["tasks"][0]["part_file"].startswith(str(data))
        assert [r["id"] for r in ledger.load_active().records] == ["j8"]
    with sqlite3.connect(db) as conn:
        raw = " ".join(row[0] for row in conn.execute("SELECT record FROM jobs UNION ALL "
                                                      "SELECT record FROM tasks"))  # fmt: skip
    assert str(tmp_path) not in raw, raw
    assert '"results/.gembatch/j8.t0a2.jsonl"' in raw
    # The same database with its data directory somewhere else (moved): found there.
    moved = tmp_path / "moved"
    with SqlLedger(url, data_dir=moved) as ledger:
        record = ledger.get("j8")
        assert record is not None
        assert paths_of(record) == [
            os.path.join(moved, p)
            for p in ("inputs/j8.jsonl", "results/j8.jsonl", "inputs/j8.jsonl")
        ] + [str(moved / "results/.gembatch/j8.t0a2.jsonl")]
