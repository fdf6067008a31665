"""A failed job keeps the step and progress at which it failed (seed 003's failure example:
`"status": "failed", "progress": 0.35, "current_step": "generating_script"`), not the
`finalizing` / 0.99 of a job that got to the end; a completed one ends at `finalizing`, 1.0.

A real `gembatch serve` on a real emulator: one job's batch cannot be created (an unknown
model: the API answers 404), one job's batch fails on Google's side (the emulator fails
batches whose display name holds `failme`), one job completes.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.server.conftest import (
    TERMINAL,
    ServiceLauncher,
    create_job,
    events_of,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)

CONFIG = {
    "clock": {"pending_seconds": 0.2, "running_seconds": 0.5},
    "faults": {"batches": {"fail_rate": 1.0, "match": "failme"}},
}


def _upload(client: httpx.Client, name: str, count: int) -> str:
    text = jsonl(request_item(f"u{n}") for n in range(1, count + 1))
    response = client.post("/api/job/batch", files={"file": (name, text)})
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def _progress_in_order(events: list[dict[str, Any]]) -> list[float]:
    return [e["data"]["progress"] for e in events if "progress" in e["data"]]


def test_a_failed_job_keeps_the_step_and_progress_where_it_failed(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(CONFIG)
    with svc.client() as client:
        not_created = create_job(client, inline_body(2, model="gemini-embedding-001"))
        failed_remotely = _upload(client, "failme.jsonl", 3)
        completed = create_job(client, inline_body(2, prefix="ok"))
        final = {job: wait_status(client, job, TERMINAL) for job in
                 (not_created, failed_remotely, completed)}  # fmt: skip
        events = {job: events_of(client, job) for job in final}

    status = final[not_created]
    assert status["status"] == "failed", status
    assert status["current_step"] == "submitting", status
    assert status["progress"] == 0.15, status  # submitting covers 0.15-0.20 (SPEC §3)
    assert status["error_details"]["step"] == "submitting", status
    assert "gemini-embedding-001" in status["error"], status  # served, not batched

    status = final[failed_remotely]
    assert status["status"] == "failed", status
    assert status["current_step"] == "processing", status
    assert 0.2 <= status["progress"] <= 0.9, status  # processing covers 0.20-0.90
    assert status["error_details"]["class"] == "BATCH_FAILED", status

    status = final[completed]
    assert status["status"] == "completed", status
    assert (status["current_step"], status["progress"]) == ("finalizing", 1.0), status

    for job, status in final.items():
        assert status["detailed_status"]["current_phase"] == status["current_step"], job
        assert status["detailed_status"]["progress_percentage"] == round(
            status["progress"] * 100, 1
        ), job
        last = events[job][-1]
        assert last["type"] == ("completed" if job == completed else "error"), last
        # The terminal event says what the status says; progress never went backwards
        # (a failure shown at `finalizing` 0.99 and then at its step would).
        assert last["data"]["current_step"] == status["current_step"], last
        progress = _progress_in_order(events[job])
        assert progress == sorted(progress), (job, progress)
        assert "finalizing" not in {
            e["data"].get("current_step") for e in events[job] if job != completed
        }, events[job]
