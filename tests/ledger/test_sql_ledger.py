"""What only the SQL ledger does: the per-job event log, deletion and pruning with an audit
trail, the webhook outbox, online backup, schema migrations, and a busy SQLite database
that never shows through to callers (real processes where concurrency is the point)."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gembatch.engine import reducers
from gembatch.jobs import InvalidTransition, Job, RemoteState, RequestCounts, RetryConfig
from gembatch.ledger import migrations
from gembatch.ledger.sql import SqlLedger, StoredEvent
from gembatch.server.events import COMPLETED, PROGRESS, STATUS, Event, audit_event, events_for

NOW = 1_750_000_000.0
OWNER = {"pid": 1, "host": "h", "role": "test"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gembatch.db'}"


@pytest.fixture
def ledger(url: str) -> Iterator[SqlLedger]:
    with SqlLedger(url, on_change=events_for) as opened:
        yield opened


def new_job(job_id: str = "job-1", tasks: int = 1, **extra: Any) -> Job:
    plans = [(i * 100, (i + 1) * 100, 10) for i in range(tasks)]
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"in/{job_id}.jsonl",
        input_path=f"/data/in/{job_id}.jsonl",
        sha256="cd" * 32,
        size_bytes=100 * tasks,
        count=10 * tasks,
        plans=plans,
        model="models/gemini-2.5-flash-lite",
        priority=0,
        retry_config=RetryConfig(),
        max_parallel_tasks=None,
        result_file=f"/data/in/results/{job_id}.jsonl",
        now=NOW,
    )
    job.extra.update(extra)
    return job


def step(reducer: Any, *args: Any) -> Any:
    return lambda record: reducer(Job.from_record(record), *args).to_record()


def record(job_id: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "input_file": f"in/{job_id}.jsonl", "status": status, **fields}


# -- events --------------------------------------------------------------------------------

BATCH = {"name": "batches/b1", "state": RemoteState.PENDING.value, "display_name": "d"}
RUNNING = {**BATCH, "state": RemoteState.RUNNING.value}
SUCCEEDED = {**BATCH, "state": RemoteState.SUCCEEDED.value, "dest": {"file_name": "files/o"}}
LIFE = [
    (reducers.claim_upload, 0, OWNER, NOW + 1),
    (reducers.uploaded, 0, "files/u1", NOW + 2),
    (reducers.claim_create, 0, OWNER, NOW + 3),
    (reducers.created, 0, BATCH, NOW + 4),
    (reducers.polled, 0, RUNNING, RequestCounts(10, 3, 0), NOW + 5),
    (reducers.polled, 0, RUNNING, RequestCounts(10, 3, 0), NOW + 6),  # nothing visible changed
    (reducers.polled, 0, RUNNING, RequestCounts(10, 7, 1), NOW + 7),
    (reducers.polled, 0, SUCCEEDED, RequestCounts(10, 9, 1), NOW + 8),
    (reducers.claim_download, 0, OWNER, NOW + 9),
    (reducers.downloaded, 0, "/tmp/p", RequestCounts(10, 9, 1), NOW + 10),
    (reducers.cleaned, 0, {"input_file": True, "batch": True}, [], NOW + 11),
]


def test_a_job_s_life_is_an_event_log_numbered_without_gaps(ledger: SqlLedger) -> None:
    assert ledger.add(new_job().to_record())
    first = ledger.events_after("job-1", 0)
    assert [(e.seq, e.type) for e in first] == [(1, STATUS)]
    assert first[0].data["status"] == "pending" and first[0].data["job_id"] == "job-1"
    assert ledger.last_seq("job-1") == 1
    for reducer, *args in LIFE:
        assert ledger.apply({"job-1": step(reducer, *args)}).errors == {}
    result = ledger.apply(
        {"job-1": lambda r: reducers.finalize(Job.from_record(r), NOW + 12, results_complete=True)
         .to_record()}
    )  # fmt: skip
    assert result.records["job-1"]["status"] == "completed"
    events = ledger.events_after("job-1", 0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert ledger.last_seq("job-1") == len(events)
    types = [e.type for e in events]
    assert types[0] == STATUS and types[-1] == COMPLETED
    assert STATUS in types[1:] and PROGRESS in types  # pending -> running, then progress
    assert types.count(COMPLETED) == 1
    # Each event is what the status endpoint shows at that moment.
    assert events[-1].data == events_for(None, ledger.get("job-1"))[0].data | {
        "status": "completed"
    }
    assert len(events) < 1 + len(LIFE) + 1  # an unchanged poll made no event


def test_no_event_without_a_committed_change(ledger: SqlLedger) -> None:
    ledger.add_many([new_job("a").to_record(), new_job("b").to_record()])

    def boom(record: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    result = ledger.apply(
        {
            "a": boom,
            "b": lambda r: {**r, "status": "completed"},  # pending -> completed: illegal
        }
    )
    assert isinstance(result.errors["a"], RuntimeError)
    assert isinstance(result.errors["b"], InvalidTransition)
    assert ledger.apply({"a": lambda r: None, "b": lambda r: dict(r)}).errors == {}
    assert [e.seq for e in ledger.events_after("a", 0)] == [1]
    assert [e.seq for e in ledger.events_after("b", 0)] == [1]
    # update_many refused as a whole: the legal change in it left no event either.
    with pytest.raises(InvalidTransition):
        ledger.update_many(
            [{**ledger.get("a"), "message": "legal"}, {**ledger.get("b"), "status": "completed"}]
        )
    assert ledger.get("a")["message"] != "legal"
    assert ledger.last_seq("a") == 1
    # The refused transition is in the audit log.
    [refusal] = ledger.audit_log("b")
    assert refusal["action"] == "refused_transition" and refusal["actor"] == "ledger"
    assert refusal["detail"]["from"] == "pending" and refusal["detail"]["to"] == "completed"


PROCESSES = 4
CHANGES = 30


def _change_messages(url: str, worker: int) -> None:
    ledger = SqlLedger(url, on_change=events_for)
    for n in range(CHANGES):
        result = ledger.apply({"job-1": lambda r, n=n: {**r, "message": f"w{worker} #{n}"}})
        if result.errors or result.missing:
            raise SystemExit(f"apply failed: {result}")


def test_concurrent_writers_leave_a_gap_free_event_log(url: str, ledger: SqlLedger) -> None:
    ledger.add(new_job().to_record())
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_change_messages, args=(url, w)) for w in range(PROCESSES)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * PROCESSES
    events = ledger.events_after("job-1", 0, limit=10_000)
    total = 1 + PROCESSES * CHANGES
    assert [e.seq for e in events] == list(range(1, total + 1))
    assert ledger.last_seq("job-1") == total
    assert [e.type for e in events] == [STATUS] + [PROGRESS] * (total - 1)
    for event in events:
        assert event.data["job_id"] == "job-1" and event.data["job_type"] == "batch"
        assert {"status", "progress", "current_step", "message", "detailed_status"} <= set(
            event.data
        )
    messages = {e.data["message"] for e in events[1:]}
    assert messages == {f"w{w} #{n}" for w in range(PROCESSES) for n in range(CHANGES)}


def test_events_page_by_seq_per_job_and_by_id_across_jobs(ledger: SqlLedger) -> None:
    ledger.add_many([new_job("a").to_record(), new_job("b").to_record()])
    for n in range(3):
        ledger.apply(
            {
                "a": lambda r, n=n: {**r, "message": f"a{n}"},
                "b": lambda r, n=n: {**r, "message": f"b{n}"},
            }
        )
    page = ledger.events_after("a", 1, limit=2)
    assert [e.seq for e in page] == [2, 3]
    assert [e.seq for e in ledger.events_after("a", page[-1].seq)] == [4]
    assert ledger.events_after("a", 4) == []
    assert ledger.events_after("nope", 0) == []

    seen: list[StoredEvent] = []
    cursor = 0
    while batch := ledger.events_since(cursor, limit=3):
        seen.extend(batch)
        cursor = batch[-1].id
    assert [e.id for e in seen] == sorted(e.id for e in seen)
    assert len(seen) == 8
    assert {(e.job_id, e.seq) for e in seen} == {(j, s) for j in "ab" for s in range(1, 5)}
    statuses = ledger.events_since(0, types=[STATUS])
    assert [(e.job_id, e.seq) for e in statuses] == [("a", 1), ("b", 1)]


def test_append_event_adds_an_event_outside_a_change(ledger: SqlLedger) -> None:
    ledger.add(new_job().to_record())
    seq = ledger.append_event("job-1", audit_event("cancel", "user:ann", {"force": True}))
    assert seq == 2 and ledger.last_seq("job-1") == 2
    stored = ledger.events_after("job-1", 1)[0]
    assert (stored.type, stored.data) == (
        "audit",
        {"action": "cancel", "actor": "user:ann", "force": True},
    )
    assert ledger.append_event("nope", Event("audit", {})) is None
    ledger.apply({"job-1": lambda r: {**r, "message": "next"}})
    assert [e.seq for e in ledger.events_after("job-1", 0)] == [1, 2, 3]


# -- the service's reads -------------------------------------------------------------------


def test_get_and_list_show_a_user_only_their_own_jobs(ledger: SqlLedger) -> None:
    for n, user in enumerate(["ann", "bob", "ann", None]):
        job = new_job(f"j{n}", user_id=user) if user else new_job(f"j{n}")
        job.created_at = f"2025-01-0{n + 1}T00:00:00+00:00"
        ledger.add(job.to_record())
    ledger.apply({"j2": lambda r: {**r, "status": "running"}})
    assert ledger.get("j1", user_id="bob")["id"] == "j1"
    assert ledger.get("j1", user_id="ann") is None  # another user's job is "not found"
    assert ledger.get("j1")["user_id"] == "bob"
    assert [r["id"] for r in ledger.list_jobs()] == ["j3", "j2", "j1", "j0"]  # newest first
    assert [r["id"] for r in ledger.list_jobs(user_id="ann")] == ["j2", "j0"]
    assert [r["id"] for r in ledger.list_jobs(user_id="ann", status="pending")] == ["j0"]
    assert [r["id"] for r in ledger.list_jobs(status=["running", "pending"], limit=2)] == [
        "j3",
        "j2",
    ]
    assert [r["id"] for r in ledger.list_jobs(limit=2, offset=2)] == ["j1", "j0"]


def test_transact_hands_select_only_the_active_jobs(ledger: SqlLedger) -> None:
    ledger.add_many([record("p", "pending"), record("r", "running"), record("c", "completed")])
    seen: list[str] = []
    ledger.transact(lambda records: seen.extend(r["id"] for r in records) or {})
    assert sorted(seen) == ["p", "r"]


# -- delete and prune ----------------------------------------------------------------------


def test_delete_removes_the_job_its_tasks_and_events_and_keeps_an_audit_row(
    url: str, ledger: SqlLedger
) -> None:
    ledger.add_many([new_job("gone", tasks=2).to_record(), new_job("kept").to_record()])
    ledger.apply({"gone": lambda r: {**r, "message": "x"}})
    deleted = ledger.delete_job("gone", actor="user:ann", reason="no longer needed")
    assert deleted is not None and deleted["id"] == "gone" and len(deleted["tasks"]) == 2
    assert ledger.get("gone") is None and ledger.last_seq("gone") is None
    assert ledger.events_after("gone", 0) == []
    assert ledger.delete_job("gone", actor="user:ann", reason="again") is None
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tasks WHERE job_id='gone'")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM tasks WHERE job_id='kept'")).scalar() == 1
    engine.dispose()
    [row] = ledger.audit_log("gone")
    assert (row["actor"], row["action"], row["job_id"]) == ("user:ann", "delete", "gone")
    assert row["detail"]["reason"] == "no longer needed" and row["detail"]["status"] == "pending"
    assert ledger.get("kept") is not None and ledger.last_seq("kept") == 1


def test_a_running_job_is_deleted_only_with_force(ledger: SqlLedger) -> None:
    ledger.add(record("run", "running"))
    with pytest.raises(InvalidTransition):
        ledger.delete_job("run", actor="user:ann", reason="oops")
    assert ledger.get("run") is not None
    assert ledger.delete_job("run", actor="user:ann", reason="forced", force=True) is not None
    actions = [(r["action"], r["detail"].get("force")) for r in ledger.audit_log("run")]
    assert actions == [("refused_transition", None), ("delete", True)]


def test_prune_removes_only_finished_jobs_older_than_the_cutoff(ledger: SqlLedger) -> None:
    day = 24 * 3600
    old = "2025-06-01T00:00:00+00:00"
    now = NOW
    recent = "2025-06-15T00:00:00+00:00"  # NOW is 2025-06-15T15:06:40Z
    ledger.add_many(
        [
            record("old-completed", "completed", completed_at=old, tasks=[{"state": "done"}]),
            record("old-failed", "failed", completed_at=old),
            record("old-cancelled", "cancelled", completed_at=old),
            record("new-completed", "completed", completed_at=recent),
            record("running", "running", created_at=old),
            record("pending", "pending", created_at=old),
            record("cancelling", "cancelling", created_at=old),
        ]
    )
    ledger.append_event("old-failed", Event("audit", {"note": "x"}))
    pruned = ledger.prune(24 * 7, now=now, batch=2)  # 3 old jobs: batches of 2 and 1
    assert sorted(pruned) == ["old-cancelled", "old-completed", "old-failed"]
    remaining = {r["id"] for r in ledger.load().records}
    assert remaining == {"new-completed", "running", "pending", "cancelling"}
    assert {e.job_id for e in ledger.events_since(0)} == remaining  # events went with jobs
    audit = ledger.audit_log()
    assert sorted(r["job_id"] for r in audit) == sorted(pruned)
    assert {r["action"] for r in audit} == {"prune"}
    # Long after, the recent one goes too; unfinished jobs never do.
    assert ledger.prune(24, now=now + 30 * day) == ["new-completed"]
    assert {r["id"] for r in ledger.load().records} == {"running", "pending", "cancelling"}


def test_a_job_finishes_when_it_becomes_terminal_and_unfinishes_on_retry(url: str) -> None:
    clock = [NOW]
    ledger = SqlLedger(url, clock=lambda: clock[0])
    ledger.add(record("j", "running"))
    ledger.apply({"j": lambda r: {**r, "status": "failed"}})  # no completed_at: the ledger's time
    clock[0] += 3600
    assert ledger.prune(2, now=clock[0]) == []
    ledger.apply({"j": lambda r: {**r, "status": "pending"}})  # retried: not finished any more
    assert ledger.prune(0, now=clock[0] + 10 * 3600) == []
    ledger.apply({"j": lambda r: {**r, "status": "cancelled"}})
    assert ledger.prune(1, now=clock[0] + 3601) == ["j"]


# -- deliveries ----------------------------------------------------------------------------


def test_deliveries_are_queued_once_and_retried_until_delivered(ledger: SqlLedger) -> None:
    payload = {"job_id": "j", "status": "completed"}
    assert ledger.enqueue_delivery(7, "j", "http://hook/a", payload, next_at=NOW)
    assert not ledger.enqueue_delivery(7, "j", "http://hook/a", {"other": 1}, next_at=NOW)
    assert ledger.enqueue_delivery(7, "j", "http://hook/b", payload, next_at=NOW + 5)
    assert ledger.enqueue_delivery(8, "j", "http://hook/a", payload, next_at=NOW + 1)
    due = ledger.due_deliveries(NOW + 1)
    assert [(d.event_id, d.url) for d in due] == [(7, "http://hook/a"), (8, "http://hook/a")]
    assert due[0].payload == payload and due[0].attempts == 0 and due[0].job_id == "j"
    ledger.mark_failed(7, "http://hook/a", "503 Service Unavailable", next_at=NOW + 60)
    ledger.mark_delivered(8, "http://hook/a", at=NOW + 2)
    assert [(d.event_id, d.url) for d in ledger.due_deliveries(NOW + 10)] == [(7, "http://hook/b")]
    [retry] = [d for d in ledger.due_deliveries(NOW + 60) if d.url == "http://hook/a"]
    assert (retry.attempts, retry.last_error) == (1, "503 Service Unavailable")
    ledger.mark_delivered(7, "http://hook/a")
    assert [d.url for d in ledger.due_deliveries(NOW + 1e6)] == ["http://hook/b"]


# -- meta ----------------------------------------------------------------------------------


def test_meta_and_the_restore_generation(url: str, ledger: SqlLedger) -> None:
    assert ledger.meta_get("nothing") is None
    ledger.meta_set("k", "v1")
    ledger.meta_set("k", "v2")
    assert ledger.meta_get("k") == "v2"
    assert ledger.restore_generation() == 0
    assert ledger.bump_restore_generation() == 1
    assert ledger.bump_restore_generation() == 2
    assert SqlLedger(url).restore_generation() == 2


# -- backup --------------------------------------------------------------------------------


def _keep_writing(url: str, started: Any, stop: Any) -> None:
    ledger = SqlLedger(url, on_change=events_for)
    n = 0
    while not stop.is_set():
        ledger.add(new_job(f"w{n}").to_record())
        ledger.apply({f"w{n}": lambda r: {**r, "message": "written"}})
        n += 1
        started.set()


def test_backup_while_another_process_writes_is_a_consistent_copy(
    url: str, ledger: SqlLedger, tmp_path: Path
) -> None:
    context = multiprocessing.get_context("fork")
    started, stop = context.Event(), context.Event()
    writer = context.Process(target=_keep_writing, args=(url, started, stop))
    writer.start()
    try:
        assert started.wait(30)
        copies = [ledger.backup(tmp_path / "backups" / f"copy-{n}.db") for n in range(3)]
    finally:
        stop.set()
        writer.join(timeout=30)
    assert writer.exitcode == 0
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == [
        "copy-0.db",
        "copy-1.db",
        "copy-2.db",
    ]
    for copy in copies:
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        restored = SqlLedger(f"sqlite:///{copy}")
        assert restored.schema_version() == migrations.LATEST
        jobs = restored.load().records
        assert jobs  # the writer had written before the first copy
        for job in jobs:  # every job in a copy has exactly its committed events
            assert [e.seq for e in restored.events_after(job["id"], 0)] == list(
                range(1, restored.last_seq(job["id"]) + 1)
            )
        restored.close()


def test_backup_is_for_sqlite_only_and_never_onto_itself(url: str, ledger: SqlLedger) -> None:
    with pytest.raises(ValueError, match="onto itself"):
        ledger.backup(url.removeprefix("sqlite:///"))


# -- migrations ----------------------------------------------------------------------------


def _schema(url: str) -> dict[str, set[str]]:
    engine = sa.create_engine(url)
    inspector = sa.inspect(engine)
    shape = {
        table: {c["name"] for c in inspector.get_columns(table)}
        | {f"index:{i['name']}" for i in inspector.get_indexes(table)}
        for table in inspector.get_table_names()
    }
    engine.dispose()
    return shape


def test_a_new_database_is_at_the_latest_schema(url: str, ledger: SqlLedger) -> None:
    assert ledger.schema_version() == migrations.LATEST
    shape = _schema(url)
    assert set(shape) == set(migrations.metadata.tables)
    for name, table in migrations.metadata.tables.items():
        columns = {c for c in shape[name] if not c.startswith("index:")}
        assert columns == {c.name for c in table.columns}, name


def _version_1_database(url: str) -> dict[str, Any]:
    job = new_job("v1-job", tasks=2).to_record()
    job["tasks"][1]["batch"] = {"name": "batches/v1"}
    stored = {**job, "tasks": []}
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        migrations.apply_migration(conn, migrations.MIGRATIONS[0])
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, status, priority, created_at, updated_at, last_seq, record)"
                " VALUES (:id, 'pending', 0, :at, :at, 0, :record)"
            ),
            {
                "id": job["id"],
                "at": "2025-01-01T00:00:00.000000+00:00",
                "record": json.dumps(stored),
            },
        )
        for idx, task in enumerate(job["tasks"]):
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (job_id, idx, state, display_name, batch_name, record)"
                    " VALUES (:job, :idx, :state, :display_name, :batch_name, :record)"
                ),
                {
                    "job": job["id"],
                    "idx": idx,
                    "state": task["state"],
                    "display_name": task["display_name"],
                    "batch_name": (task.get("batch") or {}).get("name"),
                    "record": json.dumps(task),
                },
            )
    engine.dispose()
    return job


def test_a_version_1_database_is_migrated_with_its_jobs_intact(url: str, tmp_path: Path) -> None:
    job = _version_1_database(url)
    assert SqlLedger(url).schema_version() == migrations.LATEST
    ledger = SqlLedger(url)
    assert ledger.find_by_id("v1-job") == job
    assert ledger.find_by_input("./in/v1-job.jsonl") == job  # filled in by migration 2
    assert ledger.find_by_batch("batches/v1") == job
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    SqlLedger(fresh_url).close()
    assert _schema(url) == _schema(fresh_url)


def test_a_database_newer_than_the_code_is_refused(url: str, ledger: SqlLedger) -> None:
    ledger.meta_set(migrations.SCHEMA_VERSION_KEY, str(migrations.LATEST + 1))
    with pytest.raises(migrations.SchemaTooNewError) as caught:
        SqlLedger(url)
    message = str(caught.value)
    assert f"this gembatch knows schema version {migrations.LATEST}" in message
    assert f"is at {migrations.LATEST + 1}: upgrade gembatch" in message


def _open_and_add(url: str, worker: int, go: Any) -> None:
    go.wait(30)
    ledger = SqlLedger(url)
    if not ledger.add(record(f"first-{worker}", "pending")):
        raise SystemExit("add returned False")


def test_processes_opening_a_new_database_at_once_migrate_it_once(url: str) -> None:
    context = multiprocessing.get_context("fork")
    go = context.Event()
    openers = [context.Process(target=_open_and_add, args=(url, w, go)) for w in range(6)]
    for process in openers:
        process.start()
    go.set()
    for process in openers:
        process.join(timeout=60)
    assert [p.exitcode for p in openers] == [0] * 6
    ledger = SqlLedger(url)
    assert ledger.schema_version() == migrations.LATEST
    assert len(ledger.load().records) == 6


def test_an_in_memory_database_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="database file"):
        SqlLedger("sqlite://")


# -- a busy database -----------------------------------------------------------------------

BUSY_PROCESSES = 6
BUSY_APPLIES = 200


def _hammer(url: str, worker: int) -> None:
    ledger = SqlLedger(url, on_change=events_for)
    for n in range(BUSY_APPLIES):
        own = f"h{worker}"
        result = ledger.apply(
            {
                "shared": lambda r: {**r, "counter": r["counter"] + 1},
                own: lambda r, n=n: {**r, "message": f"{n}"},
            }
        )
        if result.errors or result.missing:
            raise SystemExit(f"apply failed: {result}")
        if n % 50 == 0:
            ledger.load_active()
            ledger.events_since(0, limit=10)


def test_sqlite_busy_never_reaches_callers_under_contention(url: str, ledger: SqlLedger) -> None:
    ledger.add_many(
        [record("shared", "running", counter=0)]
        + [new_job(f"h{w}").to_record() for w in range(BUSY_PROCESSES)]
    )
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(url, w)) for w in range(BUSY_PROCESSES)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * BUSY_PROCESSES
    assert ledger.get("shared")["counter"] == BUSY_PROCESSES * BUSY_APPLIES
    for w in range(BUSY_PROCESSES):
        assert ledger.last_seq(f"h{w}") == 1 + BUSY_APPLIES


def test_a_write_lock_held_past_busy_timeout_is_waited_out(url: str) -> None:
    ledger = SqlLedger(url, busy_timeout=0.05)
    ledger.add(record("j", "running", counter=0))
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        time.sleep(0.3)  # longer than busy_timeout: SQLite itself gives up at least once
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert locked.wait(10)
    release.set()
    result = ledger.apply({"j": lambda r: {**r, "counter": r["counter"] + 1}})
    holder.join()
    assert result.errors == {} and ledger.get("j")["counter"] == 1
    assert ledger.busy_retries >= 1
