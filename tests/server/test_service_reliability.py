"""Reliability of `gembatch serve` as real processes: priorities and limits, retries by
error class, SIGKILL and restart, webhooks exactly once, backup and restore, and a
schemathesis run against the served OpenAPI schema.

Every test drives a real service process against a real emulator process and judges
outcomes only: job statuses over the API, what the emulator counted (creates per display
name, unfinished batches), what a webhook receiver got. Waits are "eventually" with
deadlines; nothing asserts how long something took.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess
from tests.server.reliability_helpers import (
    FAST_ENGINE,
    LiveBatchSampler,
    Services,
    WebhookReceiver,
    create_job,
    creates_of,
    eventually,
    gembatch,
    inline_body,
    ledger_records,
    status_of,
    wait_all,
    write_input,
)

EmulatorFactory = Callable[..., EmulatorProcess]
FAST_CLOCK = {"pending_seconds": 0.2, "running_seconds": 0.6}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path / "services")
    yield started
    started.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


def _rfc3339(value: str) -> datetime:
    """Google's timestamps carry nanoseconds; datetime keeps microseconds."""
    head, _, fraction = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}+00:00")


# -- 1. priority ----------------------------------------------------------------------------


def test_with_one_live_batch_jobs_start_in_priority_order(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    # The blocker's batch runs long enough for every other job to be queued behind it.
    emu = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 2.5}})
    svc = services(emu, "--max-live-batches", "1")
    with svc.client() as client:
        blocker = create_job(client, inline_body(1, "blocker"))
        eventually(lambda: emu.stats()["batches_created"] == 1, what="the blocker's batch")
        emu.set_config({"clock": {"pending_seconds": 0.1, "running_seconds": 0.3}})
        priorities = {
            create_job(client, inline_body(1, f"p{p}", priority=p)): p for p in (0, 5, 1, 3)
        }
        assert status_of(client, blocker)["status"] == "running"
        assert all(status_of(client, j)["status"] == "pending" for j in priorities)
    finished = wait_all(svc, [blocker, *priorities], timeout=60)
    assert {s["status"] for s in finished.values()} == {"completed"}
    svc.stop()

    records = ledger_records(svc.db_url, [blocker, *priorities])
    created = {
        job_id: _rfc3339(record["tasks"][0]["batch"]["create_time"])
        for job_id, record in records.items()
    }
    order = sorted(created, key=created.__getitem__)
    assert order[0] == blocker
    assert [priorities[j] for j in order[1:]] == [5, 3, 1, 0]
    assert all(n == 1 for n in emu.stats()["creates_by_display_name"].values())


# -- 2. limits ------------------------------------------------------------------------------


def test_live_batch_limit_is_never_exceeded_while_fifty_jobs_run(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    emu = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 0.5}})
    svc = services(emu, "--max-live-batches", "5")
    with LiveBatchSampler(emu, svc) as sampler:
        with svc.client() as client:
            jobs = [
                create_job(client, inline_body(3, f"job {n}", max_parallel_tasks=1))
                for n in range(50)
            ]
        finished = wait_all(svc, jobs, timeout=120)
    assert {s["status"] for s in finished.values()} == {"completed"}
    assert sampler.remote and sampler.service, sampler.errors
    assert max(sampler.remote) <= 5, sampler.remote
    assert max(sampler.service) <= 5, sampler.service
    # The limit was reached, not merely respected by a service that ran one at a time.
    assert max(sampler.remote) >= 3, sampler.remote
    creates = emu.stats()["creates_by_display_name"]
    assert len(creates) == 50 and set(creates.values()) == {1}


# -- 3. retries by error class --------------------------------------------------------------


def _retry(max_attempts: int, *classes: str) -> dict[str, Any]:
    config: dict[str, Any] = {"max_attempts": max_attempts, "retry_interval": 0.1}
    if classes:
        config["retry_on_errors"] = list(classes)
    return config


def test_rate_limits_and_server_errors_are_retried_until_the_job_completes(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    # Rules count calls separately and the first matching rule's status wins: uploads
    # answer 429 then 503, creates 429, 429, 503, 503, then everything goes through.
    rules = [
        {"endpoint": "files.upload", "status": 429, "first": 1, "retry_after_seconds": 0.2},
        {"endpoint": "files.upload", "status": 503, "first": 2},
        {"endpoint": "batches.create", "status": 429, "first": 2, "retry_after_seconds": 0.2},
        {"endpoint": "batches.create", "status": 503, "first": 4},
    ]
    emu = emulator_factory({"clock": FAST_CLOCK, "faults": {"rules": rules}})
    # A 503 leaves the create's outcome unknown: settled by a listing after a short grace.
    grace = {**json.loads(FAST_ENGINE), "create_grace_seconds": 1.0}
    svc = services(emu, env={"GEMBATCH_ENGINE": json.dumps(grace)})
    with svc.client() as client:
        job = create_job(
            client, inline_body(2, retry_config=_retry(6, "RATE_LIMITED", "SERVER_ERROR"))
        )
    final = wait_all(svc, [job], timeout=60)[job]
    assert final["status"] == "completed", final
    assert final["result"]["succeeded"] == 2
    # Four creates were refused; the fifth attempt made the batch.
    assert final["attempts"] == 5
    assert final["detailed_status"]["error_count"] == 6
    stats = emu.stats()
    assert stats["faults"] == {"files.upload": 2, "batches.create": 4}
    assert stats["calls"]["batches.create"] == 5
    assert list(creates_of(emu, job).values()) == [1]
    # Every refused create had its uploaded input deleted; nothing is left behind.
    eventually(lambda: emu.stats()["files"] == 0, what="no remote files left")


def test_invalid_argument_on_create_fails_the_job_without_a_retry(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    rules = [{"endpoint": "batches.create", "status": 400, "message": "Bad model config."}]
    emu = emulator_factory({"clock": FAST_CLOCK, "faults": {"rules": rules}})
    svc = services(emu)
    with svc.client() as client:
        # INVALID_INPUT is never retried, whatever retry_config says about other classes.
        job = create_job(client, inline_body(1, retry_config=_retry(5)))
    final = wait_all(svc, [job], timeout=60)[job]
    assert final["status"] == "failed", final
    details = final["error_details"]
    assert details["class"] == "INVALID_INPUT"
    assert "400" in details["code"]
    assert "Bad model config." in final["error"]
    stats = emu.stats()
    assert stats["calls"]["batches.create"] == 1
    assert creates_of(emu, job) == {}
    assert stats["files"] == 0  # the uploaded input was deleted (seed 001)
    # Terminal means terminal: a few more poll intervals bring no second create.
    with pytest.raises(AssertionError):
        eventually(lambda: emu.stats()["calls"]["batches.create"] > 1, timeout=1.0)


def test_exhausted_retry_budget_fails_after_exactly_max_attempts_creates(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    rules = [{"endpoint": "batches.create", "status": 429, "retry_after_seconds": 0.2}]
    emu = emulator_factory({"clock": FAST_CLOCK, "faults": {"rules": rules}})
    svc = services(emu)
    with svc.client() as client:
        job = create_job(client, inline_body(1, retry_config=_retry(2, "RATE_LIMITED")))
    final = wait_all(svc, [job], timeout=60)[job]
    assert final["status"] == "failed", final
    assert final["error_details"]["class"] == "RATE_LIMITED"
    assert final["error_details"]["attempt"] == 2
    assert emu.stats()["calls"]["batches.create"] == 2
    with pytest.raises(AssertionError):
        eventually(lambda: emu.stats()["calls"]["batches.create"] > 2, timeout=1.0)
    assert emu.stats()["files"] == 0


def test_a_job_that_used_up_its_retries_reports_the_attempts_it_made(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    rules = [{"endpoint": "batches.create", "status": 429, "retry_after_seconds": 0.2}]
    emu = emulator_factory({"clock": FAST_CLOCK, "faults": {"rules": rules}})
    svc = services(emu)
    with svc.client() as client:
        job = create_job(client, inline_body(1, retry_config=_retry(2, "RATE_LIMITED")))
    final = wait_all(svc, [job], timeout=60)[job]
    assert final["status"] == "failed", final
    assert final["attempts"] == 2, final


# -- 4. SIGKILL and restart -----------------------------------------------------------------


def test_service_killed_mid_run_finishes_every_job_with_one_batch_per_task(
    emulator_factory: EmulatorFactory, services: Services
) -> None:
    emu = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 1.5}})
    svc = services(emu)
    with svc.client() as client:
        running = [create_job(client, inline_body(2, f"first {n}")) for n in range(5)]
        eventually(lambda: emu.stats()["batches_created"] == 5, what="first wave submitted")
        # From now on every create does its work, then waits 4 s before answering: a kill
        # in that window leaves the ledger saying "creating" for a batch that exists.
        emu.set_config(
            {"faults": {"rules": [{"endpoint": "batches.create", "latency_after_ms": 4000}]}}
        )
        later = [create_job(client, inline_body(2, f"second {n}")) for n in range(5)]
    eventually(lambda: emu.stats()["batches_created"] >= 6, what="a create of the second wave")
    svc.kill()

    jobs = running + later
    records = ledger_records(svc.db_url, jobs)
    created = emu.stats()["creates_by_display_name"]
    lost_replies = [
        task["display_name"]
        for record in records.values()
        for task in record["tasks"]
        if task["state"] == "creating" and task["display_name"] in created
    ]
    assert lost_replies, "the kill should land between a create and its ledger write"
    unfinished = [j for j, r in records.items() if r["status"] not in ("completed", "failed")]
    assert len(unfinished) >= 5

    emu.set_config({"faults": {"rules": []}})
    svc.start()  # same database, same data directory, a new process
    finished = wait_all(svc, jobs, timeout=90)
    assert {j: s["status"] for j, s in finished.items()} == dict.fromkeys(jobs, "completed")
    with svc.client() as client:
        for job in jobs:
            results = client.get(f"/api/job/{job}/results")
            assert results.status_code == 200
            assert len(results.text.splitlines()) == 2
    stats = emu.stats()
    creates = stats["creates_by_display_name"]
    assert set(creates.values()) == {1}, creates
    assert len(creates) == stats["batches_created"] == len(jobs)
    assert all(len(creates_of(emu, job)) == 1 for job in jobs)
    eventually(lambda: emu.stats()["files"] == 0, what="no remote files left")


# -- 5. webhooks ------------------------------------------------------------------------------


def test_webhooks_arrive_once_per_finished_job_and_url_across_a_kill(
    emulator_factory: EmulatorFactory, services: Services, receiver: WebhookReceiver
) -> None:
    # Batches whose display name holds "fail-me" end FAILED (a job failure to notify).
    emu = emulator_factory(
        {"clock": FAST_CLOCK, "faults": {"batches": {"fail_rate": 1.0, "match": "fail-me"}}}
    )
    # Retries at most 2 s apart and never given up: the receiver's outage below lasts as
    # long as the machine makes it, and the test waits for the deliveries after it.
    svc = services(
        emu,
        "--notify-url",
        receiver.url("/service"),
        *("--notify-max-delay", "2", "--notify-attempts", "1000"),
        "--notify-allow-private",  # the receiver is on 127.0.0.1
    )
    write_input(svc.data_dir / "fail-me.jsonl", 2)
    receiver.down.add("/service")  # the service-wide receiver is down for a while
    job_hook = receiver.url("/job")
    with svc.client() as client:
        done = [
            create_job(client, inline_body(2, f"ok {n}", notify_url=job_hook)) for n in range(3)
        ]
        failing = create_job(client, {"input_file": "fail-me.jsonl", "notify_url": job_hook})
        unhooked = create_job(client, inline_body(1, "no per-job URL"))
        wave1 = [*done, failing, unhooked]
        first = wait_all(svc, wave1, timeout=60)
        assert first[failing]["status"] == "failed"
        assert all(first[j]["status"] == "completed" for j in [*done, unhooked])
        hooked = [*done, failing]
        eventually(lambda: set(receiver.by_job("/job")) == set(hooked), what="per-job hooks")
        eventually(
            lambda: set(receiver.by_job("/service")) == set(wave1), what="failed service hooks"
        )
        # A second wave still running at the kill, and a job that never finishes.
        emu.set_config({"clock": {"pending_seconds": 0.2, "running_seconds": 2.5}})
        wave2 = [
            create_job(client, inline_body(1, f"late {n}", notify_url=job_hook)) for n in range(2)
        ]
        eventually(lambda: emu.stats()["batches_created"] == 7, what="second wave submitted")
        emu.set_config({"clock": {"pending_seconds": 3600, "running_seconds": 3600}})
        stuck = create_job(client, inline_body(1, "stuck", notify_url=job_hook))
        eventually(lambda: emu.stats()["batches_created"] == 8, what="stuck job submitted")
    svc.kill()
    assert all(r["status"] == "running" for r in ledger_records(svc.db_url, wave2).values())

    receiver.down.clear()
    svc.start()
    finished = wait_all(svc, [*wave1, *wave2], timeout=60)
    assert all(finished[j]["status"] == "completed" for j in wave2)
    expected_job = set(hooked) | set(wave2)
    expected_service = set(wave1) | set(wave2)
    eventually(lambda: set(receiver.by_job("/job")) == expected_job, what="per-job hooks")
    eventually(
        lambda: set(receiver.by_job("/service", ok_only=True)) == expected_service,
        timeout=60,
        what="service hooks after the receiver came back",
    )
    # Whatever would arrive twice arrives now: give the notifier a few idle rounds.
    with pytest.raises(AssertionError):
        eventually(
            lambda: (
                any(len(p) > 1 for p in receiver.by_job("/job").values())
                or any(len(p) > 1 for p in receiver.by_job("/service", ok_only=True).values())
            ),
            timeout=2.0,
        )

    for path, expected in (("/job", expected_job), ("/service", expected_service)):
        delivered = receiver.by_job(path, ok_only=True)
        assert set(delivered) == expected
        for job_id, posts in delivered.items():
            assert len(posts) == 1, (path, job_id, posts)
            post = posts[0]
            body = post["body"]
            final = finished[job_id]["status"]
            assert body["job"]["status"] == final
            assert body["event"] == ("completed" if final == "completed" else "error")
            assert post["headers"]["x-gembatch-event-id"] == str(body["event_id"])
        # Retries of one delivery carry the same event id (receivers dedupe on it).
        for job_id, posts in receiver.by_job(path).items():
            assert len({p["headers"]["x-gembatch-event-id"] for p in posts}) == 1, job_id
    assert stuck not in {p["body"]["job"]["job_id"] for p in receiver.received()}
    with svc.client() as client:
        assert status_of(client, stuck)["status"] == "running"


# -- 6. backup and restore ------------------------------------------------------------------


def _backup_mid_run(
    emu: EmulatorProcess, svc: ServiceProcess, tmp_path: Path, count: int
) -> tuple[list[str], Path, list[str]]:
    """`count` jobs whose batches all exist remotely, two of them with the create's reply
    still on its way (the ledger says "creating"); a `gembatch db backup` taken then.
    Returns the jobs, the backup, and the states of their tasks in the backup."""
    with svc.client() as client:
        jobs = [create_job(client, inline_body(2, f"backup {n}")) for n in range(count)]
    eventually(lambda: emu.stats()["batches_created"] == count, what="every batch created")
    # Paused, the service cannot record the held replies while the backup is taken, however
    # slow a busy machine makes `gembatch db backup`.
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGSTOP)
    try:
        backup = tmp_path / "backup.db"
        made = gembatch("db", "backup", str(backup), "--db", svc.db_url, cwd=tmp_path)
    finally:
        svc.proc.send_signal(signal.SIGCONT)
    assert made.returncode == 0, made.stderr
    inspect = tmp_path / "inspect.db"  # read a copy: opening a ledger may write to it
    inspect.write_bytes(backup.read_bytes())
    states = [
        task["state"]
        for record in ledger_records(f"sqlite:///{inspect}", jobs).values()
        for task in record["tasks"]
    ]
    assert "creating" in states, states
    return jobs, backup, states


def test_restore_of_a_mid_run_backup_reconciles_live_batches_without_recreating(
    emulator_factory: EmulatorFactory, services: Services, tmp_path: Path
) -> None:
    # Replies held 8 s; batches that run 18 s are still live after the restart.
    rules = [{"endpoint": "batches.create", "latency_after_ms": 8000, "first": 2}]
    emu = emulator_factory(
        {"clock": {"pending_seconds": 0.5, "running_seconds": 18.0}, "faults": {"rules": rules}}
    )
    svc = services(emu)
    jobs, backup, states = _backup_mid_run(emu, svc, tmp_path, 5)
    assert set(states) == {"creating", "submitted"}, states

    refused = gembatch("db", "restore", str(backup), "--db", svc.db_url, cwd=tmp_path)
    assert refused.returncode != 0
    assert "stop `gembatch serve` first" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    # The jobs advance (every create's reply arrives), then the service stops while their
    # batches still run remotely.
    def all_submitted() -> bool:
        with svc.client() as client:
            steps = {status_of(client, j)["current_step"] for j in jobs}
        return steps <= {"queued", "processing"}

    eventually(all_submitted, timeout=30, what="every create recorded")
    svc.stop()
    restored = gembatch(
        "db", "restore", str(backup), "--db", svc.db_url, "--data-dir", str(svc.data_dir),
        cwd=tmp_path,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert "restore generation now 1" in restored.stdout

    svc.start()
    finished = wait_all(svc, jobs, timeout=60)
    assert {j: s["status"] for j, s in finished.items()} == dict.fromkeys(jobs, "completed")
    with svc.client() as client:
        for job in jobs:
            assert len(client.get(f"/api/job/{job}/results").text.splitlines()) == 2
    stats = emu.stats()
    assert set(stats["creates_by_display_name"].values()) == {1}
    assert stats["batches_created"] == len(jobs)


def test_restore_after_the_jobs_finished_keeps_them_completed_without_recreating(
    emulator_factory: EmulatorFactory, services: Services, tmp_path: Path
) -> None:
    rules = [{"endpoint": "batches.create", "latency_after_ms": 10000, "first": 2}]
    emu = emulator_factory(
        {"clock": {"pending_seconds": 0.3, "running_seconds": 2.0}, "faults": {"rules": rules}}
    )
    svc = services(emu)
    jobs, backup, _ = _backup_mid_run(emu, svc, tmp_path, 5)
    first = wait_all(svc, jobs, timeout=60)
    assert {s["status"] for s in first.values()} == {"completed"}
    svc.stop()
    creates_before = emu.stats()["calls"]["batches.create"]

    restored = gembatch(
        "db", "restore", str(backup), "--db", svc.db_url, "--data-dir", str(svc.data_dir),
        cwd=tmp_path,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    svc.start()
    finished = wait_all(svc, jobs, timeout=60)
    assert emu.stats()["calls"]["batches.create"] == creates_before
    assert set(emu.stats()["creates_by_display_name"].values()) == {1}
    assert {j: s["status"] for j, s in finished.items()} == dict.fromkeys(jobs, "completed")


# -- 7. schemathesis --------------------------------------------------------------------------


# Job ids for the fuzzed requests, by pool: each pass gets jobs of its own, so what one
# pass deletes cannot turn the next pass's requests into 404s.
POOLS = {"read": 10, "ops": 12, "delete": 30}
# The stateful phase follows the schema's links (a created job's status, events, results,
# stream, DELETE): the read pass runs it; a pass that selects none of the linked pairs
# cannot, and schemathesis would call that an error.
NO_LINKS = ["--phases", "examples,coverage,fuzzing"]
# The passes, in order: everything that leaves jobs in place, then DELETE, then cleanup
# (which deletes every finished job older than `max_age_hours`, possibly 0).
PASSES: list[tuple[str, list[str], str]] = [
    (
        "read",
        ["--exclude-path", "/api/job/cleanup", "--exclude-path", "/api/job/batch/stream",
         "--exclude-method", "DELETE"],
        '[parameters]\n"path.job_id" = { dictionary = "read" }\n\n[[operations]]\n'
        'include-name = "POST /job-operations"\n'
        'parameters = { "body.data.job_id" = { dictionary = "ops" } }\n',
    ),
    ("delete", ["--include-method", "DELETE", *NO_LINKS],
     '[parameters]\n"path.job_id" = { dictionary = "delete" }\n'),
    ("cleanup", ["--include-path", "/api/job/cleanup", *NO_LINKS], ""),
]  # fmt: skip
# Every operation on jobs must have reached a real one (a 2xx) at least once.
MUST_SUCCEED = {
    ("POST", "/api/job/batch"), ("GET", "/api/job/{id}/status"), ("GET", "/api/job/{id}/events"),
    ("GET", "/api/job/{id}/results"), ("GET", "/api/job/{id}/stream"), ("GET", "/api/jobs"),
    ("POST", "/job-operations"), ("DELETE", "/api/job/{id}"), ("POST", "/api/job/cleanup"),
}  # fmt: skip


def _schemathesis(
    svc: ServiceProcess, cwd: Path, name: str, selection: list[str], config: str, pools: dict
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """One `schemathesis run` of the served schema: the no-5xx check, a bounded number of
    examples, real job ids from `pools` (schemathesis dictionaries), and a failure on its
    "missing test data" warning (operations that mostly met 404s). Returns the run and
    the HTTP exchanges it made (its HAR report)."""
    workdir = cwd / name
    workdir.mkdir()
    dictionaries = "".join(
        f"[dictionaries.{pool}]\nvalues = {json.dumps(ids)}\n\n" for pool, ids in pools.items()
    )
    toml = workdir / "schemathesis.toml"
    toml.write_text(f'[warnings]\nfail-on = ["missing_test_data"]\n\n{dictionaries}{config}')
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(toml),
        "run", f"{svc.base_url}/openapi.json", "--url", svc.base_url,
        "--checks", "not_a_server_error", "--max-examples", "25", "--request-timeout", "30",
        "--no-color", "--report", "har", "--report-dir", str(workdir), *selection,
    ]  # fmt: skip
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=240)
    exchanges = []
    for har in workdir.glob("*.json"):
        exchanges += json.loads(har.read_text())["log"]["entries"]
    return run, exchanges


def _operation(entry: dict[str, Any]) -> tuple[str, str]:
    """(method, path) of a HAR entry, job ids written `{id}`."""
    url = entry["request"]["url"]
    path = "/" + url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
    if path not in ("/api/job/batch", "/api/job/batch/stream", "/api/job/cleanup"):
        path = re.sub(r"^/api/job/[^/]+", "/api/job/{id}", path)
    return entry["request"]["method"], path


def _dangling_refs(schema: dict[str, Any]) -> list[str]:
    """Local `$ref`s of an OpenAPI document that point at nothing."""
    found: list[str] = []

    def resolves(ref: str) -> bool:
        node: Any = schema
        for part in ref.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and not resolves(ref):
                found.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return sorted(set(found))


@pytest.fixture(params=["sqlite", "postgresql"])
def schemathesis_db(request: pytest.FixtureRequest) -> str | None:
    """The service's own SQLite file (None), or a PostgreSQL schema of the test's own."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgresql_url"))


# `schemathesis_db` comes first: fixtures are torn down in reverse order, so the service
# stops before its PostgreSQL schema is dropped.
def test_schemathesis_finds_no_server_error_in_the_served_schema(
    schemathesis_db: str | None,
    emulator_factory: EmulatorFactory,
    services: Services,
    tmp_path: Path,
) -> None:
    emu = emulator_factory({"clock": FAST_CLOCK})
    svc = services(emu, "--max-live-batches", "60", db_url=schemathesis_db)
    with svc.client() as client:
        # A name longer than the file system allows once answered 500 (ENAMETOOLONG).
        overlong = client.post("/api/job/batch", json={"input_file": "x" * 300})
        assert overlong.status_code == 400, overlong.text
        described = client.get("/openapi.json").json()["paths"]["/api/job/batch"]["post"]
        assert "CreateJobBody" in json.dumps(described["requestBody"])
        pools = {
            pool: [create_job(client, inline_body(1, f"{pool} {n}")) for n in range(count)]
            for pool, count in POOLS.items()
        }
    seeded = [job for ids in pools.values() for job in ids]
    finished = wait_all(svc, seeded, timeout=90)
    assert {s["status"] for s in finished.values()} == {"completed"}

    reached: dict[tuple[str, str], set[int]] = {}
    cleaned = 0
    for name, selection, config in PASSES:
        run, exchanges = _schemathesis(svc, tmp_path, name, selection, config, pools)
        report = run.stdout[-6000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        assert "Missing test data" not in run.stdout, report
        assert exchanges, report
        for entry in exchanges:
            status = entry["response"]["status"]
            assert status < 500, (entry["request"]["url"], status)
            reached.setdefault(_operation(entry), set()).add(status)
            if name == "cleanup" and status == 200:
                text = entry["response"]["content"].get("text") or "{}"
                cleaned += json.loads(text).get("count", 0)
    missed = {op for op in MUST_SUCCEED if not any(200 <= s < 300 for s in reached.get(op, ()))}
    assert not missed, {op: sorted(reached.get(op, ())) for op in missed}
    assert cleaned > 0, "no fuzzed cleanup deleted a job: the pass reached nothing"
    with svc.client() as client:
        assert client.get("/healthz").json()["status"] == "ok"


def test_served_openapi_schema_has_no_dangling_references(tmp_path: Path) -> None:
    """The schema `GET /openapi.json` serves, built by the app itself (no Gemini calls)."""
    from gembatch.server.app import create_app
    from gembatch.server.settings import ServerSettings

    settings = ServerSettings(db_url=f"sqlite:///{tmp_path / 'schema.db'}", data_dir=tmp_path)
    schema = create_app(settings, remote=object()).openapi()
    assert _dangling_refs(schema) == []
