"""Several `gembatch serve` processes on one PostgreSQL: claims, leases, fencing, migrations.

Why: a team behind a load balancer runs several servers on one database. They must never
run a task twice or create a remote batch twice, must survive the death of any of them,
and a server paused past its lease must not undo the work of the one that took over.
These tests run real servers on the PostgreSQL at 127.0.0.1:5432 (each test in a schema
of its own) and skip, saying why, when it is not there.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gembatch.emulator.process import EmulatorProcess
from gembatch.ledger import migrations
from gembatch.ledger.sql import SqlLedger
from gembatch.server.process import ServiceProcess
from tests.server.reliability_helpers import (
    create_job,
    eventually,
    inline_body,
    ledger_records,
)

EmulatorFactory = Callable[..., EmulatorProcess]


@pytest.fixture
def servers(tmp_path: Path, postgresql_url: str) -> Iterator[Callable[..., ServiceProcess]]:
    """Start servers that share one data directory (on several machines: shared storage).
    Depends on `postgresql_url` so that the servers stop before their schema is dropped
    (a DROP SCHEMA under live servers deadlocks with their claims)."""
    started: list[ServiceProcess] = []
    shared = tmp_path / "shared-data"

    def start(
        emu: EmulatorProcess, db_url: str, *args: str, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        svc = ServiceProcess(
            tmp_path / f"server-{len(started)}",
            env={**emu.client_env(), **(env or {})},
            db_url=db_url,
            args=["--data-dir", str(shared), "--poll-interval", "0.3", *args],
        )
        started.append(svc)
        return svc.start()

    yield start
    for svc in started:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGCONT)  # a paused one must be able to stop
        svc.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~1 min alone; 5+ min beside the rest of the suite on 2 cores
def test_three_servers_one_killed_finish_500_jobs_with_one_batch_per_task(
    emulator_factory: EmulatorFactory, servers: Any, postgresql_url: str
) -> None:
    emu = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}})
    args = ("--max-live-batches", "60", "--lease-seconds", "30")
    trio = [servers(emu, postgresql_url, *args) for _ in range(3)]

    def create(n: int) -> str:
        with trio[n % 3].client() as client:
            return create_job(client, inline_body(1, f"job {n}"))

    with ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(create, range(500)))
    assert len(set(jobs)) == 500
    # Mid-run: some batches created, most jobs still to go.
    eventually(lambda: emu.stats()["batches_created"] >= 120, timeout=120, what="a third")
    trio[1].kill()

    watcher = SqlLedger(postgresql_url)

    def all_finished() -> dict[str, int] | None:
        counts = watcher.count_jobs_by_status()
        return counts if counts.get("completed", 0) + counts.get("failed", 0) == 500 else None

    counts = eventually(all_finished, timeout=540, interval=1.0, what="every job finished")
    failed = [(r["id"], r.get("error"), r.get("errors")) for r in watcher.list_jobs(None, "failed")]
    watcher.close()
    assert counts == {"completed": 500}, (counts, failed)
    stats = emu.stats()
    twice = {name: n for name, n in stats["creates_by_display_name"].items() if n > 1}
    assert twice == {}
    assert stats["batches_created"] == 500
    records = ledger_records(postgresql_url, jobs)
    assert all(len(r["tasks"]) == 1 and r["tasks"][0]["state"] == "done" for r in records.values())
    # Every result is where any server can give it.
    with trio[2].client() as client:
        for job_id in jobs[::50]:
            response = client.get(f"/api/job/{job_id}/results")
            assert response.status_code == 200 and len(response.text.splitlines()) == 1


def test_a_server_paused_past_its_lease_cannot_undo_the_takeover(
    emulator_factory: EmulatorFactory, servers: Any, postgresql_url: str
) -> None:
    # The first create's reply is held 6 s: server A is paused while it waits for it.
    rules = [{"endpoint": "batches.create", "latency_after_ms": 6000, "first": 1}]
    emu = emulator_factory(
        {"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}, "faults": {"rules": rules}}
    )
    lease = ("--lease-seconds", "1.5")
    a = servers(emu, postgresql_url, *lease)
    with a.client() as client:
        job_id = create_job(client, inline_body(2, "paused"))
    eventually(lambda: emu.stats()["batches_created"] == 1, what="A's create reached Gemini")
    record = ledger_records(postgresql_url, [job_id])[job_id]
    assert record["tasks"][0]["state"] == "creating"
    a_claim = record["tasks"][0]["owner"]["claim"]
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # A stops renewing its lease
    try:
        b = servers(emu, postgresql_url, *lease)
        # B waits for the lease to run out, finds A's batch by its display name (no second
        # create), and runs the job to the end.
        eventually(
            lambda: ledger_records(postgresql_url, [job_id])[job_id]["status"] == "completed",
            timeout=60,
            what="B finished the job",
        )
    finally:
        a.proc.send_signal(signal.SIGCONT)  # A's reply arrives; its late write is refused
    with SqlLedger(postgresql_url) as ledger:
        eventually(
            lambda: any(
                row["action"] == "refused_transition"
                and a_claim in (row["detail"] or {}).get("message", "")
                for row in ledger.audit_log(job_id)
            ),
            timeout=30,
            what="A's late write refused and audited",
        )
    time.sleep(1.0)  # A's next cycles: nothing it does may change the finished job
    final = ledger_records(postgresql_url, [job_id])[job_id]
    assert final["status"] == "completed"
    assert final["tasks"][0]["state"] == "done"
    assert final["tasks"][0].get("owner") is None
    assert emu.stats()["batches_created"] == 1
    with b.client() as client:
        assert len(client.get(f"/api/job/{job_id}/results").text.splitlines()) == 2


def test_claims_waiting_for_their_upload_turn_keep_their_lease(
    emulator_factory: EmulatorFactory, servers: Any, postgresql_url: str
) -> None:
    """A server claims every task the limits allow at once and uploads them a few at a
    time. The claims that wait their turn must be renewed like the ones in progress:
    otherwise a second server takes them over (re-uploads them, and may create a batch
    from a file the first then deletes: 403, or pay twice)."""
    rules = [{"endpoint": "files.upload", "latency_ms": 1500}]
    emu = emulator_factory(
        {"clock": {"pending_seconds": 0.3, "running_seconds": 0.5}, "faults": {"rules": rules}}
    )
    one_at_a_time = {"GEMBATCH_ENGINE": json.dumps({"upload_concurrency": 1})}
    lease = ("--lease-seconds", "1.5", "--max-live-batches", "20")
    a = servers(emu, postgresql_url, *lease, env=one_at_a_time)
    with a.client() as client:
        jobs = [create_job(client, inline_body(1, f"queued {n}")) for n in range(6)]
    # A claimed all six; the last waits ~3.5 s for its upload turn, past its 1.5 s lease.
    eventually(lambda: emu.stats()["uploads"] >= 1, what="A's first upload")
    b = servers(emu, postgresql_url, *lease)  # would take over any claim A let expire

    def finished() -> dict[str, Any] | None:
        found = ledger_records(postgresql_url, jobs)
        done = all(r["status"] in ("completed", "failed") for r in found.values())
        return found if done else None

    records = eventually(finished, timeout=90, what="every job finished")
    assert {r["status"] for r in records.values()} == {"completed"}, records
    stats = emu.stats()
    assert stats["uploads"] == 6  # none re-uploaded by B
    assert stats["batches_created"] == 6
    assert all(n == 1 for n in stats["creates_by_display_name"].values())
    assert b.proc is not None and b.proc.poll() is None


def test_a_database_of_the_previous_schema_version_opens_and_migrates(
    postgresql_url: str, tmp_path: Path
) -> None:
    """Both databases: build schema version LATEST-1 with its own migrations, add a job
    with a task waiting to retry, open it with the current code."""
    for url in (postgresql_url, f"sqlite:///{tmp_path / 'old.db'}"):
        engine = sa.create_engine(_driver(url))
        with engine.begin() as conn:
            for migration in migrations.MIGRATIONS[:-1]:
                migrations.apply_migration(conn, migration)
            assert migrations.read_version(conn) == migrations.LATEST - 1
            task = {"index": 0, "state": "new", "not_before": 4_000_000_000.0, "attempt": 2}
            record = {"id": "old-1", "input_file": "in.jsonl", "status": "pending", "tasks": []}
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, status, priority, created_at, updated_at, last_seq, "
                    "record) VALUES ('old-1', 'pending', 0, '2026-01-01T00:00:00.000000+00:00',"
                    " '2026-01-01T00:00:00.000000+00:00', 0, :record)"
                ),
                {"record": json.dumps(record)},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (job_id, idx, state, record) VALUES ('old-1', 0, 'new', :t)"
                ),
                {"t": json.dumps(task)},
            )
        engine.dispose()
        with SqlLedger(url) as ledger:
            assert ledger.schema_version() == migrations.LATEST
            loaded = ledger.get("old-1")
            assert loaded is not None and loaded["tasks"] == [task]
            # Migration 3 filled in the task's due time: a claim now does not take it.
            taken = ledger.claim_starts(lambda records, busy: {}, max_busy=10, now=time.time())
            assert taken.records == {}
            seen: list[Any] = []

            def look(records: list[Any], busy: int, seen: list[Any] = seen) -> dict[str, Any]:
                seen.extend(records)
                return {}

            ledger.claim_starts(look, max_busy=10, now=5e9)
            assert [r["id"] for r in seen] == ["old-1"]


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)
