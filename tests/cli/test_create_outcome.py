"""One batch per task, whatever happens around a create: the command line.

`gembatch submit` is killed, or the emulator is stopped, at each step of the create path:
before the call, during it (before Gemini made the batch, or after it made it but before
the answer left), after the answer and before the ledger write. Then `gembatch poll` runs,
through an outage longer than any of its retry windows where there is one. Each time the
emulator must have made exactly one batch per task, the results must all be on disk, and
nothing may be left remotely.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from tests.cli.helpers import (
    FAST_ENGINE,
    Background,
    gembatch,
    keys_of,
    ledger,
    request_file,
    results_of,
)
from tests.conftest import wait_for

FAST = {"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}}
RETRY_FAST = ("--retry-interval", "0.3", "--max-attempts", "10")


def _engine(**settings: Any) -> str:
    return json.dumps({**json.loads(FAST_ENGINE), **settings})


def _one_batch_per_task_and_nothing_left(emulator: EmulatorProcess, *inputs: Path) -> None:
    for path in inputs:
        assert sorted(results_of(path)) == sorted(keys_of(path))
    stats = emulator.stats()
    creates = stats["creates_by_display_name"]
    assert stats["batches_created"] == len(inputs), creates
    assert set(creates.values()) == {1}, creates
    for record in ledger(inputs[0].parent):
        assert record["status"] == "completed"
        names = {t["display_name"] for t in record["tasks"]}
        assert sum(creates.get(name, 0) for name in names) == len(record["tasks"])
    wait_for(lambda: emulator.stats()["files"] == 0 and emulator.stats()["batches"] == {})


# -- the gembatch process killed --------------------------------------------------------------

# window -> (failpoint, emulator fault on batches.create, create grace in seconds)
KILLS: dict[str, tuple[str | None, dict[str, Any] | None, float | None]] = {
    "before_the_call": ("create.before_call", None, 2.0),
    # Gemini makes the batch 12 s after the call, although its sender is dead by then: a
    # listing before that must not count as "not made" (within the grace, here 20 s).
    "during_the_call_before_the_batch_is_made": (
        None,
        {"latency_ms": 12000, "detached": True},
        20.0,
    ),
    "during_the_call_after_the_batch_is_made": (None, {"latency_after_ms": 8000}, None),
    "after_the_answer_before_the_ledger_write": ("create.after_answer", None, None),
}


@pytest.mark.parametrize("window", list(KILLS))
def test_submit_killed_at_any_step_of_a_create_leaves_one_batch_per_task(
    emulator_factory: Any, tmp_path: Path, window: str
) -> None:
    point, fault, grace = KILLS[window]
    emulator = emulator_factory(FAST)
    if fault is not None:
        rule = {"endpoint": "batches.create", "first": 1, **fault}
        emulator.set_config({"faults": {"rules": [rule]}})
    engine = _engine(create_grace_seconds=grace) if grace is not None else FAST_ENGINE
    a, b = request_file(tmp_path / "a.jsonl", 4), request_file(tmp_path / "b.jsonl", 3, "b")
    env = {"GEMBATCH_ENGINE": engine}
    # b waits behind the one live batch a's create may have made.
    args = ("submit", "--max-live-batches", "1", "a.jsonl", "b.jsonl")
    submit = Background(emulator, tmp_path, *args, GEMBATCH_FAILPOINT=point or "", **env)
    if point is None:  # killed while its create is outstanding
        wait_for(lambda: emulator.stats()["calls"].get("batches.create") == 1, timeout=60)
        submit.kill()
    else:  # killed itself at the failpoint
        assert submit.wait() == -signal.SIGKILL, submit.output()
    first, second = ledger(tmp_path)
    assert first["tasks"][0]["state"] == "creating", first["tasks"][0]
    assert "batch_name" not in first["tasks"][0]  # only the intent is on record
    assert second["tasks"][0]["state"] == "new"

    polled = gembatch(
        emulator, tmp_path, "poll", "--interval", "0.2", "--max-live-batches", "1", env=env
    )

    assert polled.returncode == 0, polled.stdout + polled.stderr
    _one_batch_per_task_and_nothing_left(emulator, a, b)
    by_file = {r["input_file"]: r["tasks"][0] for r in ledger(tmp_path)}
    # b's batch came after a's: the unknown create held its slot meanwhile.
    assert by_file["b.jsonl"]["batch"]["create_time"] > by_file["a.jsonl"]["batch"]["create_time"]


# -- the emulator stopped: an outage longer than any retry window ---------------------------

# window -> (failpoint, emulator fault on batches.create, how the create was seen to start)
OUTAGES: dict[str, tuple[str | None, dict[str, Any] | None, str]] = {
    "before_the_call": ("create.before_call:stop", None, "stopped"),
    "during_the_call_before_the_batch_is_made": (None, {"latency_ms": 3000}, "called"),
    "during_the_call_after_the_batch_is_made": (None, {"latency_after_ms": 3000}, "created"),
}


def _start_create_into_an_outage(
    emulator: EmulatorProcess, tmp_path: Path, window: str, env: dict[str, str]
) -> Background:
    """`gembatch submit a.jsonl` whose create meets the emulator going down at `window`;
    returns the submit once it has ended (the emulator still down)."""
    point, fault, seen = OUTAGES[window]
    if fault is not None:
        emulator.set_config({"faults": {"rules": [{"endpoint": "batches.create", **fault}]}})
    submit = Background(
        emulator, tmp_path, "submit", *RETRY_FAST, "a.jsonl", GEMBATCH_FAILPOINT=point or "", **env
    )
    if seen == "stopped":
        wait_for(submit.stopped, timeout=60)
    elif seen == "called":
        wait_for(lambda: emulator.stats()["calls"].get("batches.create") == 1, timeout=60)
    else:
        wait_for(lambda: emulator.stats()["batches_created"] == 1, timeout=60)
    emulator.kill()
    if seen == "stopped":
        os.kill(submit.proc.pid, signal.SIGCONT)
    assert submit.wait() == 1, submit.output()
    return submit


@pytest.mark.parametrize("window", list(OUTAGES))
def test_an_outage_at_any_step_of_a_create_leaves_one_batch_per_task(
    emulator_factory: Any, tmp_path: Path, window: str
) -> None:
    emulator = emulator_factory(FAST)
    a = request_file(tmp_path / "a.jsonl", 4)
    env = {"GEMBATCH_ENGINE": _engine(create_grace_seconds=1.0)}
    submit = _start_create_into_an_outage(emulator, tmp_path, window, env)
    (record,) = ledger(tmp_path)
    task = record["tasks"][0]
    if window == "before_the_call":  # nothing was sent: a plain retry, from the same upload
        assert task["state"] == "uploaded" and task["error"]["class"] == "NETWORK"
        assert "will retry at" in submit.output()
    else:
        assert task["state"] == "create_unknown", task
        assert "create outcome unknown" in submit.output()
        assert "creates again only if none was made" in submit.output()
        shown = json.loads(gembatch(emulator, tmp_path, "status", "--json").stdout)
        assert shown[0]["create_outcome_unknown"] == 1
        table = gembatch(emulator, tmp_path, "status").stdout
        assert "create outcome unknown" in " ".join(table.split())

    # Polls through the outage: many failed tries (more than any retry loop allows) ...
    poll = Background(emulator, tmp_path, "poll", "--interval", "0.2", **env)
    try:
        wait_for(lambda: len(poll.errors()) >= 4, timeout=60)
        (record,) = ledger(tmp_path)
        assert record["status"] == "running", record["tasks"]
        if window != "before_the_call":
            assert record["tasks"][0]["state"] == "create_unknown"
            assert record["tasks"][0]["display_name"] == task["display_name"]
        emulator.start()  # ... then Gemini is back, with what it had made before
        assert poll.wait() == 0, poll.output()
    finally:
        poll.kill()
    _one_batch_per_task_and_nothing_left(emulator, a)


def test_a_job_cancelled_while_its_create_is_unknown_cancels_the_batch_it_made(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 60}})
    request_file(tmp_path / "a.jsonl", 4)
    env = {"GEMBATCH_ENGINE": _engine(create_grace_seconds=1.0)}
    _start_create_into_an_outage(emulator, tmp_path, "during_the_call_after_the_batch_is_made", env)
    cancelled = gembatch(emulator, tmp_path, "cancel", "a.jsonl", env=env)
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled.stderr
    (record,) = ledger(tmp_path)
    assert record["status"] == "cancelling"
    assert record["tasks"][0]["state"] == "create_unknown"  # the batch it may have made counts

    emulator.start()
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2", env=env)

    assert polled.returncode == 0, polled.stdout + polled.stderr
    (record,) = ledger(tmp_path)
    assert record["status"] == "cancelled" and record["final_state"] == "JOB_STATE_CANCELLED"
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["batches_cancelled"] == 1
    wait_for(lambda: emulator.stats()["files"] == 0 and emulator.stats()["batches"] == {})
