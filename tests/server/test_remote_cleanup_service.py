"""Nothing left behind remotely by `gembatch serve`: deletes that fail (500, 429) are
retried with backoff until done, after the jobs have completed too (and across a restart),
and shown meanwhile in the job's status and in `/metrics`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gembatch.emulator.process import EmulatorProcess
from tests.server.reliability_helpers import (
    FAST_ENGINE,
    Services,
    create_job,
    eventually,
    inline_body,
    metric,
    status_of,
    wait_all,
)

EmulatorFactory = Callable[..., EmulatorProcess]
DELETE_FAULTS = [
    {"endpoint": "files.delete", "status": 500},
    {"endpoint": "batches.delete", "status": 429, "retry_after_seconds": 0.2},
]
ENGINE = json.dumps(
    {**json.loads(FAST_ENGINE), "cleanup_retry_interval": 0.2, "cleanup_max_interval": 1.0}
)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path / "services")
    yield started
    started.close()


@pytest.mark.parametrize("restart", [False, True], ids=["same_process", "after_a_restart"])
def test_deletes_that_failed_are_retried_until_the_remote_is_clean(
    emulator_factory: EmulatorFactory, services: Services, restart: bool
) -> None:
    emu = emulator_factory(
        {
            "clock": {"pending_seconds": 0.2, "running_seconds": 0.6},
            "faults": {"rules": DELETE_FAULTS},
        }
    )
    svc = services(emu, env={"GEMBATCH_ENGINE": ENGINE})
    with svc.client() as client:
        jobs = [create_job(client, inline_body(2, f"job {n}")) for n in range(3)]
    finished = wait_all(svc, jobs, timeout=60)
    assert {s["status"] for s in finished.values()} == {"completed"}  # results are safe
    # More failed tries than cleanup used to get (three per file), and it keeps at it.
    eventually(lambda: emu.stats()["faults"].get("files.delete", 0) > 18, what="retries")
    with svc.client() as client:
        for job in jobs:
            status = status_of(client, job)
            assert status["status"] == "completed" and status["result"]["ok"]
            # input file, batch and output file
            assert status["detailed_status"]["remote_cleanup_pending"] == 3, status
        assert metric(client.get("/metrics").text, "gembatch_remote_cleanup_pending") == 9
    stats = emu.stats()
    assert stats["files"] == 6 and sum(stats["batches"].values()) == 3

    if restart:  # what is left is found again by a new process, from the database
        svc.kill()
        emu.set_config({"faults": {"rules": []}})
        svc.start()
    else:
        emu.set_config({"faults": {"rules": []}})  # the faults end

    eventually(
        lambda: emu.stats()["files"] == 0 and emu.stats()["batches"] == {},
        what="every file and batch deleted",
    )
    with svc.client() as client:
        eventually(
            lambda: metric(client.get("/metrics").text, "gembatch_remote_cleanup_pending") == 0,
            what="the gauge back to 0",
        )
        for job in jobs:
            status = status_of(client, job)
            assert status["status"] == "completed"
            assert status["detailed_status"]["remote_cleanup_pending"] == 0
