"""`/metrics`: the Prometheus text rendered from a real SQLite ledger, and the Remote's
call counters from real SDK calls against the emulator."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.engine import reducers
from gembatch.gemini.remote import Remote
from gembatch.jobs import Job, RequestCounts, RetryConfig
from gembatch.server.events import events_for
from gembatch.server.metrics import render

OWNER = {"pid": 1, "host": "test", "role": "test", "token": "t"}
PENDING = {"name": "batches/x", "state": "JOB_STATE_PENDING"}
SUCCEEDED = {"name": "batches/x", "state": "JOB_STATE_SUCCEEDED", "dest": {"file_name": "f/x"}}
FAILED = {"name": "batches/x", "state": "JOB_STATE_FAILED"}

# -- a small parser that enforces the exposition format -----------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse(text: str) -> dict[str, dict[str, Any]]:
    """name -> {"type", "help", "samples": {frozenset(labels): value}}; asserts the rules:
    HELP then TYPE once per family before its samples, samples named after their family,
    label sets unique, values numbers, a final newline."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and help_text, line
            assert name not in families, f"{name} described twice"
            families[name] = {"help": help_text, "type": None, "samples": {}}
            current = name
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and families[name]["type"] is None, line
            assert kind in _TYPES, line
            families[name]["type"] = kind
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, label_text, value = match.groups()
        assert name == current and families[name]["type"], f"{name}: sample before HELP/TYPE"
        labels: dict[str, str] = {}
        rest = label_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            assert label.group(1) not in labels
            labels[label.group(1)] = label.group(2)
            rest = rest[label.end() :]
        number = float(value)  # raises on anything that is not a number
        assert not math.isnan(number)
        key = frozenset(labels.items())
        assert key not in families[name]["samples"], f"duplicate sample {line!r}"
        families[name]["samples"][key] = number
    for name, family in families.items():
        assert family["type"], f"{name} has no TYPE"
        if family["type"] == "counter":
            assert all(v >= 0 for v in family["samples"].values())
    return families


def value(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    return families[name]["samples"][frozenset(labels.items())]


# -- a ledger with jobs in every status -----------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Any]:
    from gembatch.ledger.sql import SqlLedger

    led = SqlLedger(f"sqlite:///{tmp_path / 'gembatch.db'}", on_change=events_for)
    yield led
    close = getattr(led, "close", None)
    if callable(close):
        close()


def new_record(job_id: str, n: int) -> dict[str, Any]:
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"{job_id}.jsonl",
        input_path=f"/data/{job_id}.jsonl",
        sha256="0" * 64,
        size_bytes=100,
        count=n,
        plans=[(0, n, n)],
        model="gemini-2.5-flash-lite",
        priority=0,
        retry_config=RetryConfig(max_attempts=1),
        max_parallel_tasks=None,
        result_file=f"/data/results/{job_id}.jsonl",
        now=time.time(),
    )
    return job.to_record()


Step = Callable[[Job, float], Job]
UPLOADING: list[Step] = [lambda j, t: reducers.claim_upload(j, 0, OWNER, t)]
CREATING: list[Step] = [
    *UPLOADING,
    lambda j, t: reducers.uploaded(j, 0, "files/in", t),
    lambda j, t: reducers.claim_create(j, 0, OWNER, t),
]
SUBMITTED: list[Step] = [*CREATING, lambda j, t: reducers.created(j, 0, PENDING, t)]
COMPLETED: list[Step] = [
    *SUBMITTED,
    lambda j, t: reducers.polled(j, 0, SUCCEEDED, RequestCounts(4, 4, 0), t),
    lambda j, t: reducers.claim_download(j, 0, OWNER, t),
    lambda j, t: reducers.downloaded(j, 0, "/data/part", RequestCounts(4, 4, 0), t),
    lambda j, t: reducers.cleaned(j, 0, {"input_file": True, "batch": True}, [], t),
    lambda j, t: reducers.finalize(j, t, results_complete=True),
]
FAILED_STEPS: list[Step] = [
    *SUBMITTED,
    lambda j, t: reducers.polled(j, 0, FAILED, None, t),
    lambda j, t: reducers.finalize(j, t, results_complete=False),
]
CANCELLED: list[Step] = [lambda j, t: reducers.cancel(j, t)]
CANCELLING: list[Step] = [*SUBMITTED, lambda j, t: reducers.cancel(j, t)]


def advance(ledger: Any, job_id: str, steps: list[Step]) -> None:
    for step in steps:

        def change(current: dict[str, Any], step: Step = step) -> dict[str, Any]:
            return step(Job.from_record(current), time.time()).to_record()

        result = ledger.apply({job_id: change})
        assert not result.errors, result.errors


def test_metrics_count_every_status_batch_and_request(ledger: Any) -> None:
    plan = {
        "p1": (5, []),
        "p2": (5, []),
        "up": (6, UPLOADING),  # running, nothing remote yet
        "cr": (7, CREATING),  # running, a live batch being created: 7 requests in flight
        "sub": (10, SUBMITTED),  # running, live batch: 10 in flight, then 3 answered
        "cl": (8, CANCELLING),  # cancelling: shown as running; its batch is still live
        "ok1": (4, COMPLETED),
        "ok2": (4, COMPLETED),
        "bad": (2, FAILED_STEPS),
        "cx": (3, CANCELLED),
    }
    ledger.add_many([new_record(job_id, n) for job_id, (n, _) in plan.items()])
    for job_id, (_, steps) in plan.items():
        advance(ledger, job_id, steps)
    progress = {**SUCCEEDED, "state": "JOB_STATE_RUNNING"}
    advance(
        ledger, "sub", [lambda j, t: reducers.polled(j, 0, progress, RequestCounts(10, 2, 1), t)]
    )

    stats = {"calls": {"batches.get": 12, "files.upload": 3}, "errors": {"RATE_LIMITED": 2}}
    families = parse(render(ledger, remote_stats=stats, live_limit=10))

    assert families["gembatch_jobs"]["type"] == "gauge"
    assert {s: value(families, "gembatch_jobs", status=s) for s in
            ("pending", "running", "completed", "failed", "cancelled")} == {
        "pending": 2, "running": 4, "completed": 2, "failed": 1, "cancelled": 1,
    }  # fmt: skip
    assert value(families, "gembatch_live_batches") == 3  # cr, sub, cl
    assert value(families, "gembatch_live_batches_limit") == 10
    assert value(families, "gembatch_requests_in_flight") == 7 + (10 - 3) + 8
    assert value(families, "gembatch_task_states", state="uploading") == 1
    assert value(families, "gembatch_task_states", state="creating") == 1
    assert value(families, "gembatch_task_states", state="submitted") == 2
    assert value(families, "gembatch_task_states", state="new") == 2
    assert families["gembatch_api_calls_total"]["type"] == "counter"
    assert value(families, "gembatch_api_calls_total", method="batches.get") == 12
    assert value(families, "gembatch_api_calls_total", method="files.upload") == 3
    assert value(families, "gembatch_api_errors_total", **{"class": "RATE_LIMITED"}) == 2
    last = ledger.events_since(0, limit=100_000)[-1].id
    assert value(families, "gembatch_events_total") == last
    assert families["gembatch_events_total"]["type"] == "counter"
    assert value(families, "gembatch_notifications_pending") == 0


def test_metrics_of_an_empty_service_show_every_status_at_zero(ledger: Any) -> None:
    families = parse(render(ledger, remote_stats=None, live_limit=100))
    statuses = {dict(k)["status"]: v for k, v in families["gembatch_jobs"]["samples"].items()}
    assert statuses == dict.fromkeys(("pending", "running", "completed", "failed", "cancelled"), 0)
    assert value(families, "gembatch_live_batches") == 0
    assert value(families, "gembatch_live_batches_limit") == 100
    assert value(families, "gembatch_events_total") == 0
    assert families["gembatch_api_calls_total"]["samples"] == {}


def test_metrics_count_queued_notifications(ledger: Any) -> None:
    ledger.add_many([new_record("j1", 1)])
    [event] = ledger.events_since(0)
    ledger.enqueue_delivery(event.id, "j1", "http://127.0.0.1:9/a", {"event": "completed"})
    ledger.enqueue_delivery(event.id, "j1", "http://127.0.0.1:9/b", {"event": "completed"})
    ledger.mark_failed(event.id, "http://127.0.0.1:9/b", "HTTP 500", time.time() + 3600)
    families = parse(render(ledger, remote_stats=None, live_limit=10))
    assert value(families, "gembatch_notifications_pending") == 2
    ledger.mark_delivered(event.id, "http://127.0.0.1:9/a", time.time())
    families = parse(render(ledger, remote_stats=None, live_limit=10))
    assert value(families, "gembatch_notifications_pending") == 1


def test_label_values_are_escaped(ledger: Any) -> None:
    stats = {"calls": {'we"ird\\name\n': 1}, "errors": {}}
    families = parse(render(ledger, remote_stats=stats, live_limit=1))
    assert value(families, "gembatch_api_calls_total", method='we\\"ird\\\\name\\n') == 1


def test_remote_counts_calls_by_method_and_errors_by_class(
    emulator: EmulatorProcess, ledger: Any
) -> None:
    async def scenario() -> dict[str, Any]:
        async with Remote(emulator.api_key, emulator.base_url) as remote:
            await remote.list_batches()
            await remote.list_files()
            with pytest.raises(Exception):  # noqa: B017 - any SDK error: it is classified
                await remote.get_batch("batches/does-not-exist")
            assert not await remote.delete_batch("batches/does-not-exist")
            return remote.stats_snapshot()

    stats = asyncio.run(scenario())
    assert stats["calls"] == {
        "batches.list": 1,
        "files.list": 1,
        "batches.get": 1,
        "batches.delete": 1,
    }
    assert stats["errors"] == {"NOT_FOUND": 2}
    families = parse(render(ledger, remote_stats=stats, live_limit=1))
    assert value(families, "gembatch_api_errors_total", **{"class": "NOT_FOUND"}) == 2


def finished_record(job_id: str, steps: list[Step]) -> dict[str, Any]:
    """A job taken through `steps` in memory, to be added as it ends up."""
    job = Job.from_record(new_record(job_id, 4))
    for step in steps:
        job = step(job, time.time())
    return job.to_record()


def test_job_counts_and_event_total_without_reading_every_record(ledger: Any) -> None:
    ledger.add_many(
        [finished_record(f"ok{i}", COMPLETED) for i in range(37)]
        + [finished_record(f"bad{i}", FAILED_STEPS) for i in range(5)]
        + [new_record(f"p{i}", 1) for i in range(3)]
    )
    families = parse(render(ledger, remote_stats=None, live_limit=10))
    assert value(families, "gembatch_jobs", status="completed") == 37
    assert value(families, "gembatch_jobs", status="failed") == 5
    assert value(families, "gembatch_jobs", status="cancelled") == 0
    assert value(families, "gembatch_jobs", status="pending") == 3
    assert value(families, "gembatch_events_total") == 45  # one `status` event per job


@pytest.mark.parametrize("bound", [0, 1, 2, 3, 7, 8, 9, 100, 1023, 1024, 1025, 99_999])
def test_first_missing_finds_the_bound(bound: int) -> None:
    from gembatch.server.metrics import _first_missing

    calls: list[int] = []

    def exists(k: int) -> bool:
        calls.append(k)
        return k < bound

    assert _first_missing(exists) == bound
    assert len(calls) <= 2 * max(1, bound).bit_length() + 2
