"""The SQL ledger keeps each job's public status with the job, for one-read status calls.

Why: every browser on the dashboard polls `GET /api/job/{id}/status`; the service answers
with the JSON the ledger stored at the job's last change instead of rebuilding the job. It
must always be the status of the record as it is now, on SQLite and PostgreSQL, for the
job's own user only, and databases written before the column existed must still answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gembatch.engine import reducers
from gembatch.jobs import Job, RemoteState, RequestCounts, RetryConfig
from gembatch.ledger import migrations
from gembatch.ledger.sql import SqlLedger
from gembatch.server.app import status_of_record
from gembatch.server.events import events_for

NOW = 1_750_000_000.0
OWNER = {"pid": 1, "host": "h", "role": "test", "claim": "c1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gembatch.db'}"
    return request.getfixturevalue("postgresql_url")


@pytest.fixture
def ledger(url: str) -> Iterator[SqlLedger]:
    with SqlLedger(url, on_change=events_for, view=status_of_record) as opened:
        yield opened


def new_record(job_id: str, user: str = "alice") -> dict[str, Any]:
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"in/{job_id}.jsonl",
        input_path=f"/data/in/{job_id}.jsonl",
        sha256="ab" * 32,
        size_bytes=100,
        count=10,
        plans=[(0, 100, 10)],
        model="models/gemini-2.5-flash-lite",
        priority=3,
        retry_config=RetryConfig(),
        max_parallel_tasks=None,
        result_file=f"/data/in/results/{job_id}.jsonl",
        now=NOW,
    )
    job.extra["user_id"] = user
    return job.to_record()


def stored(ledger: SqlLedger, job_id: str, user: str | None = None) -> dict[str, Any] | None:
    text = ledger.status_view(job_id, user)
    return None if text is None else json.loads(text)


def expected(ledger: SqlLedger, job_id: str) -> dict[str, Any]:
    record = ledger.get(job_id)
    assert record is not None
    return status_of_record(record)


def test_the_stored_status_follows_every_change_of_the_job(ledger: SqlLedger) -> None:
    ledger.add_many([new_record("j1")])
    assert stored(ledger, "j1") == expected(ledger, "j1")
    assert stored(ledger, "j1")["status"] == "pending"  # type: ignore[index]

    steps = [
        lambda job: reducers.claim_upload(job, 0, OWNER, NOW + 1),
        lambda job: reducers.uploaded(job, 0, "files/in1", NOW + 2),
        lambda job: reducers.claim_create(job, 0, OWNER, NOW + 3),
        lambda job: reducers.created(
            job, 0, {"name": "batches/b1", "state": "JOB_STATE_PENDING"}, NOW + 4
        ),
        lambda job: reducers.polled(
            job,
            0,
            {"name": "batches/b1", "state": RemoteState.RUNNING.value},
            RequestCounts(total=10, succeeded=4),
            NOW + 5,
        ),
    ]
    seen = []
    for step in steps:
        ledger.apply({"j1": lambda record, step=step: step(Job.from_record(record)).to_record()})
        now = stored(ledger, "j1")
        assert now == expected(ledger, "j1")
        seen.append((now["status"], now["current_step"], now["requests"]["succeeded"]))  # type: ignore[index]
    assert seen[-1] == ("running", "processing", 4)
    assert len(set(seen)) > 2  # it moved with the job, not frozen at the first write


def test_another_users_job_and_a_missing_one_have_no_status(ledger: SqlLedger) -> None:
    ledger.add_many([new_record("j2", user="alice")])
    assert stored(ledger, "j2", "alice") == expected(ledger, "j2")
    assert ledger.status_view("j2", "bob") is None
    assert ledger.status_view("nope") is None
    ledger.delete_job("j2", actor="test", reason="test", force=True)
    assert ledger.status_view("j2") is None


def test_a_job_written_before_the_column_existed_is_answered_from_its_record(
    ledger: SqlLedger,
) -> None:
    ledger.add_many([new_record("j3")])
    with ledger._engine.begin() as conn:  # as an older gembatch left it
        conn.execute(sa.update(migrations.jobs).values(view=None))
    assert stored(ledger, "j3") == expected(ledger, "j3")
    assert stored(ledger, "j3", "bob") is None
