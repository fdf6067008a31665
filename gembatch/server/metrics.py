"""`GET /metrics`: the service's state in the Prometheus text exposition format.

Why: an operator (seed 004's resource monitoring) needs to see, from outside, how many
jobs wait or run, how close the service is to Gemini's limit on live batches, how many
requests are in flight, and whether Gemini is answering with errors. One scrape builds
all of it from the ledger (aggregates where the ledger offers them) and the Remote's
call counters; no metrics library is needed for a dozen gauges and counters.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gembatch import __version__
from gembatch.engine.reducers import remote_cleanup_pending
from gembatch.jobs import TASK_LIVE, Job, JobStatus, TaskState

PUBLIC_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
_FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
# due_deliveries(now=far future) lists every delivery still to be sent (including the
# ones waiting for their backoff); this bounds one scrape's work.
_PENDING_DELIVERIES_SCAN = 100_000
_FAR_FUTURE_SECONDS = 10 * 365 * 86400


def render(ledger: Any, *, remote_stats: dict[str, Any] | None, live_limit: int) -> str:
    """Every metric, as the body of a `text/plain; version=0.0.4` response."""
    out = _Exposition()
    active = [Job.from_record(r) for r in ledger.load_active().records]

    out.family("gembatch_info", "gauge", "gembatch's version.", [({"version": __version__}, 1)])
    jobs = count_jobs_by_status(ledger, active)
    out.family(
        "gembatch_jobs",
        "gauge",
        "Jobs by public status (cancelling counts as running).",
        [({"status": s}, jobs[s]) for s in PUBLIC_STATUSES],
    )

    tasks = Counter(t.state for job in active for t in job.tasks)
    live = sum(tasks[s] for s in TASK_LIVE)
    in_flight = sum(t.requests.pending for job in active for t in job.tasks if t.state in TASK_LIVE)
    out.family(
        "gembatch_live_batches",
        "gauge",
        "Remote batches being created or submitted (held against the live-batch limit).",
        [({}, live)],
    )
    out.family(
        "gembatch_live_batches_limit",
        "gauge",
        "The service's limit on live remote batches.",
        [({}, live_limit)],
    )
    out.family(
        "gembatch_requests_in_flight",
        "gauge",
        "Requests of live remote batches not answered yet.",
        [({}, in_flight)],
    )
    out.family(
        "gembatch_task_states",
        "gauge",
        "Tasks (remote batches) of unfinished jobs, by state.",
        [({"state": s.value}, tasks[s]) for s in TaskState],
    )
    out.family(
        "gembatch_remote_cleanup_pending",
        "gauge",
        "Remote files and batches whose delete failed, retried with backoff until done.",
        [({}, cleanup_pending(ledger, active))],
    )

    stats = remote_stats or {}
    out.family(
        "gembatch_api_calls_total",
        "counter",
        "Gemini API calls made by this process, by SDK method.",
        _labelled("method", stats.get("calls")),
    )
    out.family(
        "gembatch_api_errors_total",
        "counter",
        "Gemini API calls that failed, by error class.",
        _labelled("class", stats.get("errors")),
    )
    out.family(
        "gembatch_events_total",
        "counter",
        "Job events recorded in the ledger (the highest event id).",
        [({}, last_event_id(ledger))],
    )
    out.family(
        "gembatch_notifications_pending",
        "gauge",
        "Webhook notifications not delivered yet and not given up.",
        [({}, pending_notifications(ledger))],
    )
    return out.text()


# -- reading the ledger -------------------------------------------------------------------


def count_jobs_by_status(ledger: Any, active: Iterable[Job] | None = None) -> dict[str, int]:
    """Jobs per public status. Uses the ledger's SQL aggregate when it has one; otherwise
    counts unfinished jobs from `load_active` and finished ones by probing `list_jobs`
    offsets (a few one-row queries, never every record)."""
    counts = dict.fromkeys(PUBLIC_STATUSES, 0)
    aggregate = getattr(ledger, "count_jobs_by_status", None)
    if callable(aggregate):
        for status, n in aggregate().items():
            public = _public(status)
            if public in counts:
                counts[public] += int(n)
        return counts
    if active is None:
        active = [Job.from_record(r) for r in ledger.load_active().records]
    for job in active:
        counts[job.status.public] += 1
    for status in _FINISHED:
        counts[status.value] = _first_missing(
            lambda k, s=status.value: bool(ledger.list_jobs(status=s, limit=1, offset=k))
        )
    return counts


def last_event_id(ledger: Any) -> int:
    """The highest event id (events are numbered globally, in order)."""
    method = getattr(ledger, "last_event_id", None)
    if callable(method):
        return int(method() or 0)
    return _first_missing(lambda k: bool(ledger.events_since(k, limit=1)))


def _first_missing(exists: Callable[[int], bool]) -> int:
    """The least k >= 0 with `exists(k)` false, for a predicate true below some bound and
    false from it on ("is there a row at offset k", "is there an event above id k"):
    exponential then binary search, about 2 log2(k) calls."""
    if not exists(0):
        return 0
    low, high = 0, 1  # exists(low) holds; is high past the end?
    while exists(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if exists(middle):
            low = middle
        else:
            high = middle
    return high


def cleanup_pending(ledger: Any, active: Iterable[Job]) -> int:
    """Remote items still to delete, of unfinished jobs and of finished ones (which the
    ledger finds by index when it can)."""
    pending = sum(remote_cleanup_pending(job) for job in active)
    load = getattr(ledger, "load_cleanup_pending", None)
    if callable(load):
        pending += sum(remote_cleanup_pending(Job.from_record(r)) for r in load().records)
    return pending


def pending_notifications(ledger: Any) -> int:
    method = getattr(ledger, "count_pending_deliveries", None)
    if callable(method):
        return int(method() or 0)
    far = time.time() + _FAR_FUTURE_SECONDS
    return len(ledger.due_deliveries(far, limit=_PENDING_DELIVERIES_SCAN))


def _public(status: Any) -> str:
    try:
        return JobStatus(status).public
    except ValueError:
        return str(status)


def _labelled(label: str, counter: Mapping[str, int] | None) -> list[tuple[dict[str, str], int]]:
    return [({label: key}, value) for key, value in sorted((counter or {}).items())]


# -- the text format ---------------------------------------------------------------------


class _Exposition:
    """Prometheus text format 0.0.4: per family `# HELP`, `# TYPE`, then its samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
