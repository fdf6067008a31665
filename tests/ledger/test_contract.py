"""The ledger contract, proven on every backend: the same tests against JsonlLedger and the
SQL ledger on SQLite and on PostgreSQL (each test in a schema of its own; skipped, saying
why, when no PostgreSQL server is reachable)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gembatch.engine import reducers
from gembatch.engine.engine import Engine, EngineLedger
from gembatch.inputs import validate_file
from gembatch.jobs import (
    JOB_TRANSITIONS,
    InvalidTransition,
    Job,
    JobStatus,
    RemoteState,
    RequestCounts,
    RetryConfig,
)
from gembatch.ledger import Ledger, derive_id
from gembatch.ledger.jsonl import ApplyResult, JsonlLedger
from gembatch.ledger.sql import SqlLedger
from tests.conftest import write_requests

# -- backends ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """Where a ledger lives; `open()` works in any process (children open their own)."""

    kind: str
    where: str

    def open(self) -> Any:
        if self.kind == "jsonl":
            return JsonlLedger(self.where, timeout=120, retry_interval=0.002)
        return SqlLedger(self.where)


def _jsonl(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return str(tmp_path / "job-info.jsonl")


def _sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return f"sqlite:///{tmp_path / 'gembatch.db'}"


def _postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("postgresql_url"))  # skips, saying why, without one


# kind -> how to get a fresh, empty store for one test.
BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], str]] = {
    "jsonl": _jsonl,
    "sqlite": _sqlite,
    "postgresql": _postgresql,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, BACKENDS[request.param](tmp_path, request))


@pytest.fixture
def ledger(backend: Backend) -> Iterator[Any]:
    opened = backend.open()
    yield opened
    close = getattr(opened, "close", None)
    if close is not None:
        close()


def job(n: int | str, **fields: Any) -> dict[str, Any]:
    return {"id": f"job-{n}", "input_file": f"in/{n}.jsonl", "count": 1, **fields}


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in records}


# -- the interface -------------------------------------------------------------------------


def test_every_ledger_implements_the_ledger_and_engine_interfaces(ledger: Any) -> None:
    assert isinstance(ledger, Ledger)
    for name in ("load", "load_active", "add_many", "apply", "transact"):
        assert callable(getattr(ledger, name))
    engine_ledger: EngineLedger = ledger  # the engine's Protocol, checked by type checkers
    assert engine_ledger is ledger


# -- add -----------------------------------------------------------------------------------


def test_add_stores_a_record_and_refuses_a_second_with_the_same_id(ledger: Any) -> None:
    assert ledger.add(job(1, status="pending"))
    assert not ledger.add(job(1, status="pending", count=99))
    assert ledger.load().records == [job(1, status="pending")]


def test_add_many_adds_each_new_record_and_refuses_duplicates(ledger: Any) -> None:
    assert ledger.add(job(1))
    added = ledger.add_many([job(2), job(1, count=5), job(3), job(2, count=7)])
    assert added == [True, False, True, False]
    assert by_id(ledger.load().records) == by_id([job(1), job(2), job(3)])
    assert ledger.add_many([]) == []


def test_a_record_without_id_gets_its_stable_derived_id(ledger: Any) -> None:
    legacy = {"input_file": "old.jsonl", "job_name": "batches/legacy1", "count": 2}
    assert ledger.add(legacy)
    expected_id = derive_id(legacy)
    assert ledger.find_by_id(expected_id) == {"id": expected_id, **legacy}
    assert not ledger.add(dict(legacy))  # the same record again: same id, refused


def test_a_record_with_an_unusable_id_is_refused(ledger: Any) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        ledger.add({"id": "", "input_file": "a.jsonl"})
    with pytest.raises(ValueError, match="non-empty string"):
        ledger.add_many([job(1), {"id": 7}])
    assert ledger.load().records == []


# -- find ----------------------------------------------------------------------------------


def test_find_by_id_input_and_batch(ledger: Any) -> None:
    tasks = [
        {"index": 0, "state": "done", "batch": {"name": "batches/t0"}},
        {"index": 1, "state": "submitted", "batch": {"name": "batches/t1"}},
    ]
    ledger.add_many(
        [
            job(1, input_file="data/a.jsonl", tasks=tasks, batch={"name": "batches/t1"}),
            job(2, input_file="data/b.jsonl", batch={"name": "batches/top"}),
            {"id": "legacy", "input_file": "c.jsonl", "job_name": "batches/old"},
        ]
    )
    assert ledger.find_by_id("job-2")["input_file"] == "data/b.jsonl"
    assert ledger.find_by_id("nope") is None
    assert ledger.find_by_input("./data/a.jsonl")["id"] == "job-1"
    assert ledger.find_by_input("data//b.jsonl")["id"] == "job-2"
    assert ledger.find_by_input("data/zzz.jsonl") is None
    assert ledger.find_by_batch("batches/t0")["id"] == "job-1"  # only inside a task
    assert ledger.find_by_batch("batches/t1")["id"] == "job-1"
    assert ledger.find_by_batch("batches/top")["id"] == "job-2"
    assert ledger.find_by_batch("batches/old")["id"] == "legacy"  # v0.1.0 `job_name`
    assert ledger.find_by_batch("batches/none") is None


def test_found_records_are_copies(ledger: Any) -> None:
    ledger.add(job(1, tasks=[{"index": 0, "state": "new"}]))
    found = ledger.find_by_id("job-1")
    found["count"] = 42
    found["tasks"][0]["state"] = "mutated"
    assert ledger.find_by_id("job-1") == job(1, tasks=[{"index": 0, "state": "new"}])


def test_find_by_input_returns_the_first_of_several_jobs_for_one_input(ledger: Any) -> None:
    ledger.add(job("old", input_file="x.jsonl", created_at="2024-01-01T00:00:00+00:00"))
    ledger.add(job("new", input_file="./x.jsonl", created_at="2024-06-01T00:00:00+00:00"))
    assert ledger.find_by_input("x.jsonl")["id"] == "job-old"


# -- load ----------------------------------------------------------------------------------


def test_load_returns_every_record_and_load_active_the_unfinished_ones(ledger: Any) -> None:
    statuses = [s.value for s in JobStatus]
    ledger.add_many([job(s, status=s) for s in statuses] + [job("foreign")])
    snapshot = ledger.load()
    assert snapshot.problems == []
    assert set(by_id(snapshot.records)) == {f"job-{s}" for s in [*statuses, "foreign"]}
    active = ledger.load_active()
    assert set(by_id(active.records)) == {
        "job-pending",
        "job-running",
        "job-cancelling",
        "job-foreign",  # no status: the original tool's record counts as active
    }
    assert by_id(active.records)["job-running"] == job("running", status="running")


# -- apply ---------------------------------------------------------------------------------


def test_apply_runs_each_change_on_the_freshest_record(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    first.add(job(1, counter=0))
    second.apply({"job-1": lambda r: {**r, "counter": r["counter"] + 1, "by": "second"}})
    seen: list[dict[str, Any]] = []

    def change(record: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(record))
        return {**record, "counter": record["counter"] + 1}

    result = first.apply({"job-1": change})
    assert seen[0]["counter"] == 1 and seen[0]["by"] == "second"
    assert result.records["job-1"]["counter"] == 2
    assert second.find_by_id("job-1")["counter"] == 2


def test_apply_writes_all_its_changes_at_once(ledger: Any) -> None:
    ledger.add_many([job(n, counter=0) for n in range(5)])
    before = ledger.writes
    changes = {f"job-{n}": (lambda r: {**r, "counter": r["counter"] + 1}) for n in range(5)}
    result = ledger.apply(changes)
    assert ledger.writes == before + 1
    assert {r["counter"] for r in result.records.values()} == {1}
    assert all(r["counter"] == 1 for r in ledger.load().records)


def test_apply_none_or_the_same_record_changes_nothing(ledger: Any) -> None:
    ledger.add(job(1, status="pending"))
    before = ledger.writes
    result = ledger.apply({"job-1": lambda r: None})
    assert result.records == {"job-1": job(1, status="pending")}
    result = ledger.apply({"job-1": lambda r: dict(r)})
    assert result.records == {"job-1": job(1, status="pending")}
    assert ledger.writes == before


def test_apply_isolates_a_failing_change_and_reports_missing_ids(ledger: Any) -> None:
    ledger.add_many([job(1, v=0), job(2, v=0), job(3, v=0)])

    def boom(record: dict[str, Any]) -> dict[str, Any]:
        record["v"] = "half-done"  # a change that mutates its argument, then fails
        raise RuntimeError("boom")

    result = ledger.apply(
        {
            "job-1": lambda r: {**r, "v": 1},
            "job-2": boom,
            "job-3": lambda r: {**r, "v": 3},
            "job-404": lambda r: {**r, "v": 404},
        }
    )
    assert isinstance(result, ApplyResult)
    assert set(result.records) == {"job-1", "job-3"}
    assert isinstance(result.errors["job-2"], RuntimeError)
    assert result.missing == ["job-404"]
    assert {r["id"]: r["v"] for r in ledger.load().records} == {"job-1": 1, "job-2": 0, "job-3": 3}
    assert ledger.find_by_id("job-404") is None


def test_apply_keeps_the_id_even_if_a_change_drops_or_alters_it(ledger: Any) -> None:
    ledger.add(job(1))
    result = ledger.apply({"job-1": lambda r: {"input_file": "x.jsonl", "id": "other"}})
    assert result.records["job-1"] == {"id": "job-1", "input_file": "x.jsonl"}
    assert ledger.find_by_id("other") is None


def test_every_illegal_status_change_is_refused_and_every_legal_one_applied(ledger: Any) -> None:
    statuses = list(JobStatus)
    pairs = [(old, new) for old in statuses for new in statuses]
    ledger.add_many([job(f"{old}-{new}", status=old.value) for old, new in pairs])
    result = ledger.apply(
        {
            f"job-{old}-{new}": (lambda r, new=new: {**r, "status": new.value, "touched": True})
            for old, new in pairs
        }
    )
    legal = {(src, dst) for (src, _), dst in JOB_TRANSITIONS.items() if src and dst}
    stored = by_id(ledger.load().records)
    for old, new in pairs:
        key = f"job-{old}-{new}"
        if old == new or (old, new) in legal:
            assert key not in result.errors, key
            assert stored[key]["status"] == new.value and stored[key]["touched"]
        else:
            assert isinstance(result.errors[key], InvalidTransition), key
            assert stored[key] == job(f"{old}-{new}", status=old.value), key
    assert (JobStatus.COMPLETED, JobStatus.RUNNING) not in legal  # the table is really used
    assert isinstance(result.errors["job-completed-running"], InvalidTransition)


def test_an_unknown_status_is_refused(ledger: Any) -> None:
    ledger.add(job(1, status="pending"))
    result = ledger.apply({"job-1": lambda r: {**r, "status": "paused"}})
    assert isinstance(result.errors["job-1"], InvalidTransition)
    assert ledger.find_by_id("job-1")["status"] == "pending"


# -- update_many ---------------------------------------------------------------------------


def test_update_many_replaces_by_id_counts_matches_and_ignores_unknown_ids(ledger: Any) -> None:
    ledger.add_many([job(1, v=0), job(2, v=0)])
    assert ledger.update_many([job(1, v=1), job(99, v=1), {"id": "job-2", "only": "this"}]) == 2
    assert by_id(ledger.load().records) == {
        "job-1": job(1, v=1),
        "job-2": {"id": "job-2", "only": "this"},
    }


def test_update_many_with_an_illegal_status_change_changes_nothing(ledger: Any) -> None:
    ledger.add_many([job(1, status="pending"), job(2, status="completed")])
    with pytest.raises(InvalidTransition):
        ledger.update_many([job(1, status="running"), job(2, status="running")])
    assert by_id(ledger.load().records) == {
        "job-1": job(1, status="pending"),
        "job-2": job(2, status="completed"),
    }


# -- transact ------------------------------------------------------------------------------


def test_transact_decides_from_the_current_records_then_applies(backend: Backend) -> None:
    ledger, other = backend.open(), backend.open()
    ledger.add_many([job(n, status="pending", claimed=False) for n in range(4)])
    other.apply({"job-0": lambda r: {**r, "status": "running", "claimed": True}})
    seen: list[list[dict[str, Any]]] = []

    def select(records: list[dict[str, Any]]) -> dict[str, Any]:
        seen.append(records)
        unclaimed = sorted(r["id"] for r in records if not r["claimed"])
        claim = lambda r: {**r, "status": "running", "claimed": True}  # noqa: E731
        return {job_id: claim for job_id in unclaimed[:2]}

    result = ledger.transact(select)
    assert by_id(seen[0])["job-0"]["claimed"]  # what the other writer did is visible
    assert set(result.records) == {"job-1", "job-2"}
    assert [r["id"] for r in ledger.load().records if not r["claimed"]] == ["job-3"]


def test_transact_applies_nothing_when_select_returns_nothing(ledger: Any) -> None:
    ledger.add(job(1, status="pending"))
    before = ledger.writes
    result = ledger.transact(lambda records: {})
    assert result.records == {} and result.errors == {} and result.missing == []
    assert ledger.writes == before
    assert ledger.load().records == [job(1, status="pending")]


def test_transact_can_add_records_decided_from_the_current_ones(ledger: Any) -> None:
    ledger.add(job(1, status="pending"))

    def select(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        known = {r["input_file"] for r in records}
        wanted = [job(n, status="pending") for n in (1, 2, 3)]
        bump = {"job-1": lambda r: {**r, "seen": True}}
        return bump, [r for r in wanted if r["input_file"] not in known]

    result = ledger.transact(select)
    assert result.added == [True, True]
    assert result.records["job-1"]["seen"] is True
    assert set(by_id(ledger.load().records)) == {"job-1", "job-2", "job-3"}


def test_select_may_call_the_ledger_inside_transact(ledger: Any) -> None:
    ledger.add(job(1, status="pending"))

    def select(records: list[dict[str, Any]]) -> dict[str, Any]:
        assert ledger.add_many([job(2, status="pending")]) == [True]
        assert ledger.find_by_id("job-2") is not None
        return {"job-1": lambda r: {**r, "v": 1}}

    result = ledger.transact(select)
    assert result.records["job-1"]["v"] == 1
    assert set(by_id(ledger.load().records)) == {"job-1", "job-2"}


def test_the_engine_records_jobs_and_refuses_the_same_input_twice(
    ledger: Any, tmp_path: Path
) -> None:
    source = write_requests(tmp_path / "requests.jsonl", ["a", "b", "c"])
    engine = Engine(ledger, remote=None)  # type: ignore[arg-type]  # add_jobs makes no call
    first = engine.add_jobs([validate_file(source)], model="gemini-2.5-flash-lite")
    second = engine.add_jobs([validate_file(source)], model="gemini-2.5-flash-lite")
    assert first[0].job is not None and second[0].job is None
    assert second[0].existing is not None and second[0].existing.id == first[0].job.id
    assert [r["id"] for r in ledger.load().records] == [first[0].job.id]
    assert ledger.find_by_id(first[0].job.id) == first[0].job.to_record()


# -- records round-trip exactly ------------------------------------------------------------


def test_unknown_fields_survive_every_write(ledger: Any) -> None:
    record = {
        "x-top": {"nested": [1, 2.5, None, True, "ünïcode ✓"]},
        "id": "job-u",
        "tasks": [{"index": 0, "state": "new", "x-task": {"keep": ["me"]}}, {"odd": 1}],
        "input_file": "in/u.jsonl",
        "status": "pending",
        "empty": {},
    }
    ledger.add(record)
    assert ledger.find_by_id("job-u") == record
    assert list(ledger.find_by_id("job-u")) == list(record)  # key order kept
    result = ledger.apply({"job-u": lambda r: {**r, "progress": 0.5}})
    assert result.records["job-u"] == {**record, "progress": 0.5}
    ledger.update_many([{**record, "tasks": record["tasks"][:1]}])
    assert ledger.find_by_id("job-u") == {**record, "tasks": record["tasks"][:1]}
    ledger.update_many([{**record, "tasks": "not-a-list"}])
    assert ledger.find_by_id("job-u") == {**record, "tasks": "not-a-list"}


def test_records_moved_through_the_reducers_round_trip_exactly(ledger: Any) -> None:
    now = 1_750_000_000.0
    created = reducers.new_job(
        job_id="job-r",
        input_file="in/r.jsonl",
        input_path="/data/in/r.jsonl",
        sha256="ab" * 32,
        size_bytes=3000,
        count=30,
        plans=[(0, 1000, 10), (1000, 2000, 10), (2000, 3000, 10)],
        model="models/gemini-2.5-flash-lite",
        priority=3,
        retry_config=RetryConfig(),
        max_parallel_tasks=2,
        result_file="/data/in/results/r.jsonl",
        now=now,
    )
    assert ledger.add(created.to_record())
    assert ledger.find_by_id("job-r") == created.to_record()
    owner = {"pid": 1, "host": "h", "role": "test"}
    batch = {"name": "batches/b0", "state": RemoteState.PENDING.value, "display_name": "d"}
    done = {**batch, "state": RemoteState.SUCCEEDED.value, "dest": {"file_name": "files/out"}}
    steps: list[Callable[[Job], Job]] = [
        lambda j: reducers.claim_upload(j, 0, owner, now + 1),
        lambda j: reducers.uploaded(j, 0, "files/up0", now + 2),
        lambda j: reducers.claim_create(j, 0, owner, now + 3),
        lambda j: reducers.created(j, 0, batch, now + 4),
        lambda j: reducers.polled(j, 0, batch, RequestCounts(10, 4, 1), now + 5),
        lambda j: reducers.polled(j, 0, done, RequestCounts(10, 9, 1), now + 6),
        lambda j: reducers.claim_download(j, 0, owner, now + 7),
        lambda j: reducers.downloaded(j, 0, "/tmp/part0", RequestCounts(10, 9, 1), now + 8),
        lambda j: reducers.cleaned(j, 0, {"input_file": True, "batch": True}, [], now + 9),
        lambda j: reducers.cancel(j, now + 10),
    ]
    expected = created
    for step in steps:
        expected = step(expected)
        result = ledger.apply({"job-r": lambda r, step=step: step(Job.from_record(r)).to_record()})
        assert result.errors == {}
        assert result.records["job-r"] == expected.to_record()
        assert ledger.find_by_id("job-r") == expected.to_record()
    assert ledger.find_by_id("job-r")["status"] == JobStatus.CANCELLED.value


# -- concurrent writers (real processes) ---------------------------------------------------

WRITERS = 8
INCREMENTS = 25
ADDERS = 4
ADDS = 100


def _increment(backend: Backend, n: int) -> None:
    ledger = backend.open()
    for _ in range(n):
        result = ledger.apply({"job-c": lambda r: {**r, "counter": r["counter"] + 1}})
        if result.errors or result.missing:
            raise SystemExit(f"apply failed: {result}")


def test_concurrent_applies_lose_no_update(backend: Backend) -> None:
    backend.open().add(job("c", counter=0, status="running"))
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_increment, args=(backend, INCREMENTS)) for _ in range(WRITERS)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * WRITERS
    assert backend.open().find_by_id("job-c")["counter"] == WRITERS * INCREMENTS


def _add_jobs(backend: Backend, writer: int) -> None:
    ledger = backend.open()
    for n in range(ADDS):
        if not ledger.add(job(f"{writer}-{n}", status="pending", progress=0)):
            raise SystemExit(f"add of job-{writer}-{n} returned False")


def _rewrite(backend: Backend, stop: Any, rounds: Any) -> None:
    ledger = backend.open()
    done = 0
    while not stop.is_set() or done == 0:
        records = ledger.load().records
        if records:
            ledger.update_many([{**r, "progress": r["progress"] + 1} for r in records])
            done += 1
        time.sleep(0.01)
    rounds.value = done


def test_concurrent_adds_while_another_process_rewrites_lose_no_job(backend: Backend) -> None:
    context = multiprocessing.get_context("fork")
    stop, rounds = context.Event(), context.Value("i", 0)
    rewriter = context.Process(target=_rewrite, args=(backend, stop, rounds))
    rewriter.start()
    adders = [context.Process(target=_add_jobs, args=(backend, w)) for w in range(ADDERS)]
    for process in adders:
        process.start()
    for process in adders:
        process.join(timeout=120)
    stop.set()
    rewriter.join(timeout=60)
    assert [p.exitcode for p in adders] == [0] * ADDERS
    assert rewriter.exitcode == 0 and rounds.value > 0
    records = backend.open().load().records
    assert len(records) == ADDERS * ADDS
    assert {r["id"] for r in records} == {
        f"job-{w}-{n}" for w in range(ADDERS) for n in range(ADDS)
    }
    assert any(r["progress"] > 0 for r in records)  # the rewrites landed
