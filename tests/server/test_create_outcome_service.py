"""One batch per task, whatever happens around a create: `gembatch serve`.

The service is killed (and started again on the same database), or the emulator is
stopped while the service goes on, at each step of the create path: before the call,
during it (before Gemini made the batch, or after it made it but before the answer left),
after the answer and before the ledger write. Each time the emulator must have made
exactly one batch per task, every job must complete with its results, and nothing may be
left remotely. While a create's outcome is unknown the service says so.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess
from tests.server.reliability_helpers import (
    FAST_ENGINE,
    Services,
    create_job,
    eventually,
    inline_body,
    ledger_records,
    metric,
    status_of,
    wait_all,
)

EmulatorFactory = Callable[..., EmulatorProcess]
FAST_CLOCK = {"pending_seconds": 0.3, "running_seconds": 1.0}
RETRY_FAST = {"max_attempts": 10, "retry_interval": 0.3}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path / "services")
    yield started
    started.close()


def _env(grace: float | None = None, failpoint: str | None = None) -> dict[str, str]:
    engine = json.loads(FAST_ENGINE)
    if grace is not None:
        engine["create_grace_seconds"] = grace
    env = {"GEMBATCH_ENGINE": json.dumps(engine)}
    if failpoint:
        env["GEMBATCH_FAILPOINT"] = failpoint
    return env


def _fault(emu: EmulatorProcess, fault: dict[str, Any] | None, *rules: dict[str, Any]) -> None:
    if fault is not None:
        rules = (*rules, {"endpoint": "batches.create", "first": 1, **fault})
    emu.set_config({"faults": {"rules": list(rules)}})


def _stopped(svc: ServiceProcess) -> bool:
    assert svc.proc is not None
    with open(f"/proc/{svc.proc.pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] == "T"


def _one_batch_per_task_and_nothing_left(
    emu: EmulatorProcess, svc: ServiceProcess, jobs: list[str]
) -> None:
    finished = wait_all(svc, jobs, timeout=90)
    assert {j: s["status"] for j, s in finished.items()} == dict.fromkeys(jobs, "completed")
    with svc.client() as client:
        for job in jobs:
            assert len(client.get(f"/api/job/{job}/results").text.splitlines()) == 2
    creates = emu.stats()["creates_by_display_name"]
    assert set(creates.values()) == {1} and emu.stats()["batches_created"] == len(jobs), creates
    for job, record in ledger_records(svc.db_url, jobs).items():
        names = [t["display_name"] for t in record["tasks"]]
        assert [creates.get(name) for name in names] == [1], (job, names, creates)
    eventually(
        lambda: emu.stats()["files"] == 0 and emu.stats()["batches"] == {},
        what="nothing left remotely",
    )


# -- the service killed -----------------------------------------------------------------------

# window -> (failpoint, emulator fault on the first batches.create, create grace in seconds)
KILLS: dict[str, tuple[str | None, dict[str, Any] | None, float | None]] = {
    "before_the_call": ("create.before_call", None, 2.0),
    # Gemini makes the batch 12 s after the call, its sender dead by then: listings before
    # that must not count as "not made" (within the grace, here 20 s).
    "during_the_call_before_the_batch_is_made": (
        None,
        {"latency_ms": 12000, "detached": True},
        20.0,
    ),
    "during_the_call_after_the_batch_is_made": (None, {"latency_after_ms": 8000}, None),
    "after_the_answer_before_the_ledger_write": ("create.after_answer", None, None),
}


@pytest.mark.parametrize("window", list(KILLS))
def test_service_killed_at_any_step_of_a_create_leaves_one_batch_per_task(
    emulator_factory: EmulatorFactory, services: Services, window: str
) -> None:
    point, fault, grace = KILLS[window]
    emu = emulator_factory({"clock": FAST_CLOCK})
    # The first upload is slow: the second job is in before the first one's create.
    _fault(emu, fault, {"endpoint": "files.upload", "first": 1, "latency_ms": 1500})
    svc = services(emu, "--max-live-batches", "1", env=_env(grace, point))
    with svc.client() as client:
        first = create_job(client, inline_body(2, "first"))
        # It waits behind the one live batch the first's create may have made.
        second = create_job(client, inline_body(2, "second"))
    if point is None:
        eventually(lambda: emu.stats()["calls"].get("batches.create") == 1, what="a create sent")
        svc.kill()
    else:
        assert svc.proc is not None and svc.proc.wait(60) == -signal.SIGKILL
    records = ledger_records(svc.db_url, [first, second])
    assert records[first]["tasks"][0]["state"] == "creating"
    assert "batch_name" not in records[first]["tasks"][0]  # only the intent is on record
    assert records[second]["tasks"][0]["state"] == "new"

    svc.env.pop("GEMBATCH_FAILPOINT", None)
    svc.start()  # same database, a new process

    _one_batch_per_task_and_nothing_left(emu, svc, [first, second])
    records = ledger_records(svc.db_url, [first, second])
    created = [records[j]["tasks"][0]["batch"]["create_time"] for j in (first, second)]
    assert created[0] < created[1], created  # the unknown create held its slot


# -- the emulator stopped: an outage longer than any retry window ----------------------------

# window -> (failpoint, emulator fault on the first batches.create, how the create starts)
OUTAGES: dict[str, tuple[str | None, dict[str, Any] | None, str]] = {
    "before_the_call": ("create.before_call:stop", None, "stopped"),
    "during_the_call_before_the_batch_is_made": (None, {"latency_ms": 3000}, "called"),
    "during_the_call_after_the_batch_is_made": (None, {"latency_after_ms": 3000}, "created"),
}


@pytest.mark.parametrize("window", list(OUTAGES))
def test_an_outage_at_any_step_of_a_create_leaves_one_batch_per_task_in_the_service(
    emulator_factory: EmulatorFactory, services: Services, window: str
) -> None:
    point, fault, seen = OUTAGES[window]
    emu = emulator_factory({"clock": FAST_CLOCK})
    if fault is not None:
        _fault(emu, fault)
    svc = services(emu, env=_env(1.0, point))
    with svc.client() as client:
        job = create_job(client, inline_body(2, retry_config=RETRY_FAST))
    if seen == "stopped":
        eventually(lambda: _stopped(svc), what="the service stopped before its create")
    elif seen == "called":
        eventually(lambda: emu.stats()["calls"].get("batches.create") == 1, what="create sent")
    else:
        eventually(lambda: emu.stats()["batches_created"] == 1, what="the batch made")
    emu.kill()
    if seen == "stopped":
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGCONT)

    with svc.client() as client:
        # Gemini stays away for longer than any retry loop: many failed tries...
        eventually(
            lambda: status_of(client, job)["detailed_status"]["error_count"] >= 4,
            what="failed tries during the outage",
        )
        status = status_of(client, job)
        assert status["status"] == "running", status
        if window != "before_the_call":
            assert status["message"].startswith("create outcome unknown"), status["message"]
            assert "waiting for Gemini to list batches" in status["message"]
            assert status["current_step"] == "submitting"
            assert status["detailed_status"]["create_outcome_unknown"] == 1
            text = client.get("/metrics").text
            assert metric(text, "gembatch_live_batches") == 1  # it may be one: it counts
            assert 'gembatch_task_states{state="create_unknown"} 1' in text
        (record,) = ledger_records(svc.db_url, [job]).values()
        assert record["tasks"][0]["attempt"] == 1 or window == "before_the_call"
    if window == "during_the_call_after_the_batch_is_made":
        svc.kill()  # the unknown outcome outlives the process that met it
        svc.start()
        with svc.client() as client:
            assert status_of(client, job)["detailed_status"]["create_outcome_unknown"] == 1
    emu.start()  # ... then it is back, with what it made before

    _one_batch_per_task_and_nothing_left(emu, svc, [job])
