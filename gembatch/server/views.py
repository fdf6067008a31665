"""What clients see of a job: seed 003's JobStatus, plus seed 004's detailed_status.

Why: web backends already poll `/api/job/{id}/status` and listen to SSE written against
seed 003's shapes (`status`, `progress` 0..1, `current_step`, `message`, `result`, `error`
as a string); gembatch keeps those exactly and adds its own fields beside them. One
function builds the object for the status endpoint, the job list and every SSE event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gembatch.engine.reducers import remote_cleanup_pending
from gembatch.jobs import Job, JobStatus, TaskState, parse_time

JOB_TYPE = "batch"


def api_time(value: Any) -> str | None:
    """`2024-01-21T12:00:00.000Z`, the format seed 003 shows."""
    epoch = parse_time(value)
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def job_status(job: Job) -> dict[str, Any]:
    """The JobStatus object (seed 003) with gembatch's and seed 004's fields beside it."""
    counts = job.requests
    cancelling = job.status is JobStatus.CANCELLING
    status = job.status.public  # `cancelling` is shown as running, step `cancelling`
    step = "cancelling" if cancelling else (job.step.value if job.step else None)
    error_text = None
    error_details = None
    if job.error is not None and job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        error_text = job.error.message
    if job.error is not None:
        error_details = job.error.to_dict()
    if job.status is JobStatus.CANCELLED and error_text is None:
        error_text = "cancelled"
    active = sum(1 for t in job.tasks if t.live or t.state in _IN_FLIGHT)
    return {
        "job_id": job.id,
        "job_type": JOB_TYPE,
        "status": status,
        "progress": round(job.progress, 4),
        "current_step": step,
        "message": job.message,
        "result": _result(job),
        "error": error_text,
        "created_at": api_time(job.created_at),
        "updated_at": api_time(job.updated_at),
        "priority": job.priority,
        "attempts": job.attempts,
        "detailed_status": {
            "current_phase": step,
            "progress_percentage": round(job.progress * 100, 1),
            "active_tasks": active,
            "error_count": len(job.errors),
            # Creates waiting for a listing to say whether their batch exists (the message
            # says so), and remote items whose delete failed and is being retried.
            "create_outcome_unknown": sum(
                1 for t in job.tasks if t.state is TaskState.CREATE_UNKNOWN
            ),
            "remote_cleanup_pending": remote_cleanup_pending(job),
        },
        "error_details": error_details,
        "requests": counts.to_dict(),
        "display_name": job.extra.get("display_name"),
        "model": job.model,
        "metadata": job.extra.get("metadata") or {},
        "completed_at": api_time(job.completed_at),
        "final_state": job.final_state,
        "duration_seconds": job.duration_seconds,
    }


_IN_FLIGHT = frozenset({TaskState.UPLOADING, TaskState.SUCCEEDED, TaskState.DOWNLOADING})


def _result(job: Job) -> dict[str, Any] | None:
    """For a completed job: where the results are and what they hold."""
    if job.status is not JobStatus.COMPLETED:
        return None
    counts = job.requests
    return {
        "ok": True,
        "results_url": f"/api/job/{job.id}/results",
        "requests": counts.total,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "message": job.message,
    }


def public_record(job: Job) -> dict[str, Any]:
    """A job for the job list: the status object plus its tasks' remote names."""
    view = job_status(job)
    view["tasks"] = [
        {
            "index": t.index,
            "attempt": t.attempt,
            "state": t.state.value,
            "batch_name": t.batch_name,
            "remote_state": t.remote_state.value if t.remote_state else None,
            "requests": t.requests.to_dict(),
        }
        for t in job.tasks
    ]
    return view
