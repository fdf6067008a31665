"""Which change of a job is which event (`status`, `progress`, `completed`, `error`).

Why: SSE clients (seed 003) react to event types, and a client that reconnects with
`Last-Event-ID` must get exactly the events it missed. So events are not sent on the fly:
the SQL ledger writes them into the job's event log in the same transaction as the change
that caused them, numbered per job without gaps (the number is the SSE `id`). This module
decides, from the record before and after a change, which events that change produces;
it is pure and shared by every ledger that keeps an event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gembatch.jobs import Job, JobStatus
from gembatch.server.views import job_status

STATUS = "status"  # the job's status changed (and the first event of every job)
PROGRESS = "progress"  # step, progress, counts or message changed
COMPLETED = "completed"  # terminal: completed (the stream ends after it)
ERROR = "error"  # terminal: failed, cancelled or deleted (the stream ends after it)
AUDIT = "audit"  # an action or a refused transition, for the audit log
TERMINAL_EVENTS = frozenset({COMPLETED, ERROR})


@dataclass(frozen=True)
class Event:
    type: str
    data: dict[str, Any]


def events_for(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[Event]:
    """The events a change from record `old` to record `new` produces (None: no job)."""
    if new is None:
        if old is None:
            return []
        snapshot = job_status(Job.from_record(old))
        snapshot.update(status="failed", error="deleted", message="job deleted")
        return [Event(ERROR, {**snapshot, "code": "DELETED"})]
    after = Job.from_record(new)
    view = job_status(after)
    if old is None:
        return [Event(STATUS, view)]
    before = Job.from_record(old)
    if after.status is not before.status:
        if after.status is JobStatus.COMPLETED:
            return [Event(COMPLETED, view)]
        if after.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            return [Event(ERROR, {**view, "code": _error_code(after)})]
        return [Event(STATUS, view)]
    if _visible(job_status(before)) != _visible(view):
        return [Event(PROGRESS, view)]
    return []


def audit_event(action: str, actor: str, detail: dict[str, Any]) -> Event:
    return Event(AUDIT, {"action": action, "actor": actor, **detail})


def _visible(view: dict[str, Any]) -> tuple[Any, ...]:
    """What a progress bar shows: a change in anything else makes no event."""
    return (
        view["status"],
        view["current_step"],
        view["progress"],
        view["message"],
        view["requests"]["succeeded"],
        view["requests"]["failed"],
        view["detailed_status"]["active_tasks"],
        view["detailed_status"]["error_count"],
    )


def _error_code(job: Job) -> str:
    if job.status is JobStatus.CANCELLED:
        return "CANCELLED"
    if job.error is not None:
        return job.error.error_class.value
    return "FAILED"
