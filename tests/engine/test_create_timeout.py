"""A create that timed out while Gemini went on making the batch: the real engine and SDK
in this process (with a 1 s client timeout), against an emulator process.

"No batch listed" right after a timeout means nothing: the create may still be in flight
inside Gemini. The task must wait out the grace, keep its uploaded input (the batch may be
reading it), and take the batch that lands late instead of creating another.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gembatch.engine.engine import Engine, EngineSettings
from gembatch.gemini.remote import Remote
from gembatch.inputs import validate_files
from gembatch.jobs import JobStatus, TaskState
from gembatch.ledger.jsonl import JsonlLedger
from tests.cli.helpers import request_file


def test_a_create_that_timed_out_waits_for_the_batch_that_lands_after_it(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 0.5}})
    # Gemini makes the batch 4 s after the call; the client gives up after 1 s.
    rule = {"endpoint": "batches.create", "first": 1, "latency_ms": 4000, "detached": True}
    emulator.set_config({"faults": {"rules": [rule]}})
    request_file(tmp_path / "a.jsonl", 3)
    settings = EngineSettings(create_grace_seconds=8.0, poll_retry_interval=0.2)

    async def run() -> tuple[list[Any], list[TaskState], Any]:
        async with Remote(emulator.api_key, emulator.base_url, timeout=1.0) as remote:
            engine = Engine(JsonlLedger(tmp_path / "job-info.jsonl"), remote, settings)
            (added,) = engine.add_jobs(
                validate_files([tmp_path / "a.jsonl"]), model="gemini-2.5-flash-lite"
            )
            assert added.job is not None
            (outcome,) = await engine.start()
            seen = []
            for _ in range(400):  # cycles a fraction of a second apart: 20 s at most
                job = engine.jobs()[0]
                seen.append(job.tasks[0].state)
                if job.status.terminal:
                    break
                await engine.cycle()
                await asyncio.sleep(0.05)
            return [outcome], seen, engine.jobs()[0]

    (outcome,), seen, job = asyncio.run(run())

    assert outcome.unknown and "create outcome unknown" in outcome.message
    assert seen[0] is TaskState.CREATE_UNKNOWN
    assert job.status is JobStatus.COMPLETED, job.message
    task = job.tasks[0]
    assert task.attempt == 1  # the batch of the create that timed out, not a second one
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["calls"]["batches.create"] == 1
    assert stats["uploads"] == 1  # its input was kept, not deleted and uploaded again
    assert (tmp_path / "results" / "a.jsonl").read_text().count("\n") == 3
