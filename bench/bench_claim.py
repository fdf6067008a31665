"""Claim throughput: 10,000 queued jobs claimed by several servers on SQLite and PostgreSQL.

SPEC §11: >= 500 claims/s, the global limit of live batches never exceeded. Three worker
processes (three "servers") each run the engine's own claim path (`Engine._claim_starts`,
which is `SqlLedger.claim_starts`: one short transaction, serialised for the global limit,
reading only the jobs it may take, `FOR UPDATE SKIP LOCKED` on PostgreSQL) in a loop, and
finish what they claimed at once (one write), which frees the slots for the next claims.
A sampler counts the busy tasks in the database all along; the figure is claims per second
over the whole run. The bound printed beside it is the same number of single-row writes
(one transaction each) on the same database, measured in the same run.

    python bench/bench_claim.py [--jobs 10000] [--workers 3] [--limit 100] [--db both]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import machine_note  # noqa: E402

TARGET = 500.0  # claims per second
PG = os.environ.get("GEMBATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _records(n: int) -> list[dict[str, Any]]:
    from gembatch.engine import reducers
    from gembatch.jobs import RetryConfig

    now = time.time()
    return [
        reducers.new_job(
            job_id=f"b{i:06d}",
            input_file=f"in/{i}.jsonl",
            input_path=f"/nonexistent/{i}.jsonl",
            sha256=f"{i:064x}",
            size_bytes=100,
            count=1,
            plans=[(0, 100, 1)],
            model="models/gemini-2.5-flash-lite",
            priority=i % 5,
            retry_config=RetryConfig(),
            max_parallel_tasks=None,
            result_file=f"/nonexistent/results/{i}.jsonl",
            now=now + i * 1e-6,
        ).to_record()
        for i in range(n)
    ]


def _finish(record: dict[str, Any]) -> dict[str, Any]:
    """Stand-in for the rest of a task's life: it is over, its slot is free."""
    record["tasks"][0]["state"] = "done"
    record["tasks"][0].pop("owner", None)
    record["status"] = "completed"
    return record


def _worker(url: str, limit: int, counter: Any, over: Any) -> None:
    from gembatch.engine.engine import Engine, EngineSettings
    from gembatch.ledger.sql import SqlLedger

    ledger = SqlLedger(url)
    engine = Engine(ledger, None, EngineSettings(max_live_batches=limit), role="bench")  # type: ignore[arg-type]
    idle = 0
    while idle < 20:
        claimed = engine._claim_starts(None)
        if not claimed:
            idle += 1
            time.sleep(0.01)
            continue
        idle = 0
        with counter.get_lock():
            counter.value += len(claimed)
        ledger.apply({job.id: _finish for job, _ in claimed})
    ledger.close()


def _sampler(url: str, limit: int, stop: threading.Event, worst: list[int]) -> None:
    import sqlalchemy as sa

    from gembatch.ledger import migrations as m
    from gembatch.ledger.sql import BUSY_TASK_STATES, SqlLedger

    ledger = SqlLedger(url)
    query = (
        sa.select(sa.func.count()).select_from(m.tasks).where(m.tasks.c.state.in_(BUSY_TASK_STATES))
    )
    while not stop.is_set():
        busy = ledger._run(lambda conn: conn.execute(query).scalar() or 0, write=False)
        worst[0] = max(worst[0], int(busy))
        time.sleep(0.005)
    ledger.close()


def _bound(url: str, writes: int) -> float:
    """Seconds for `writes` single-row updates, one transaction each, same database."""
    from gembatch.ledger.sql import SqlLedger

    ledger = SqlLedger(url)
    ledger.add({"id": "bound", "input_file": "x", "status": "pending", "n": 0})
    started = time.perf_counter()
    for n in range(writes):
        ledger.apply({"bound": lambda r, n=n: {**r, "n": n + 1}})
    elapsed = time.perf_counter() - started
    ledger.close()
    return elapsed


def run(url: str, name: str, jobs: int, workers: int, limit: int, target: float = TARGET) -> bool:
    from gembatch.ledger.sql import SqlLedger

    setup = time.perf_counter()
    ledger = SqlLedger(url)
    records = _records(jobs)
    for start in range(0, jobs, 2000):
        ledger.add_many(records[start : start + 2000])
    ledger.close()
    setup = time.perf_counter() - setup

    ctx = multiprocessing.get_context("spawn")
    counter, over = ctx.Value("i", 0), ctx.Value("i", 0)
    stop, worst = threading.Event(), [0]
    sampler = threading.Thread(target=_sampler, args=(url, limit, stop, worst), daemon=True)
    sampler.start()
    procs = [ctx.Process(target=_worker, args=(url, limit, counter, over)) for _ in range(workers)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - started - 0.2  # the workers' idle wait at the end
    stop.set()
    sampler.join()
    claims = counter.value
    rate = claims / wall
    bound = _bound(url, 300)
    per_write = bound / 300
    ok = rate >= target and worst[0] <= limit and claims == jobs
    print(
        f"  {name}: {claims} claims by {workers} processes in {wall:.2f} s = {rate:.0f} claims/s "
        f"(target >= {target:g}: {'ok' if rate >= target else 'MISSED'}, "
        f"{rate / target:.2f} x target); set-up {setup:.1f} s"
    )
    if claims != jobs:
        print(f"    only {claims} of {jobs} jobs were claimed: MISSED")
    print(
        f"    global limit {limit}: most busy tasks seen {worst[0]} "
        f"({'never exceeded' if worst[0] <= limit else 'EXCEEDED'})"
    )
    print(
        f"    bound, same run: one single-row write transaction {per_write * 1000:.2f} ms "
        f"({1 / per_write:.0f}/s); claims run at {rate * per_write:.1f} x that rate "
        f"(each claim transaction takes up to {limit} tasks)"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--target", type=float, default=TARGET, help="claims per second")
    args = parser.parse_args()
    print(f"machine: {machine_note()}")
    print(
        f"claim throughput: {args.jobs} queued jobs, {args.workers} processes, limit {args.limit}"
    )
    ok = True
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            ok &= run(
                f"sqlite:///{tmp}/claims.db",
                "SQLite",
                args.jobs,
                args.workers,
                args.limit,
                args.target,
            )
    if args.db in ("postgresql", "both"):
        import psycopg

        schema = f"gbbench_{secrets.token_hex(4)}"
        admin = PG.replace("postgresql+psycopg://", "postgresql://")
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
        except Exception as exc:
            print(f"  PostgreSQL: skipped, {PG} is not reachable: {exc}")
            return 0 if ok else 1
        try:
            url = f"{PG}?options=-csearch_path%3D{schema}"
            ok &= run(url, "PostgreSQL", args.jobs, args.workers, args.limit, args.target)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
