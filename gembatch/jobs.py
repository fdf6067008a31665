"""Jobs and tasks: their states, steps, errors, and the transitions between them.

Why: a job's life (validate, upload, create, wait for hours, download, clean up) crosses
processes, crashes and two front ends. If every module decided on its own what "done"
means, a running batch would get deleted (the original tool did exactly that). So the
vocabulary lives here once: states and steps are enums, legal transitions are one table
of data that every writer checks, and a job record converts losslessly to and from the
ledger's JSON (including records written by the original tool).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

# --------------------------------------------------------------------------------------
# States, steps, events
# --------------------------------------------------------------------------------------


class JobStatus(StrEnum):
    """A job's status. The first five are seed 003's public statuses plus `cancelled`;
    `cancelling` is internal (a cancel was asked and is being carried out)."""

    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def public(self) -> str:
        """The status shown to clients (seed 003's vocabulary plus `cancelled`)."""
        return "running" if self is JobStatus.CANCELLING else self.value


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
# Unfinished jobs: what each engine cycle works on.
ACTIVE_STATUSES = frozenset(s for s in JobStatus if s not in TERMINAL_STATUSES)
# Jobs whose tasks may be started (uploaded and created); a cancelling one starts nothing.
STARTABLE_STATUSES = frozenset({JobStatus.PENDING, JobStatus.RUNNING})
# What clients see (seed 003's vocabulary plus `cancelled`), in the order of a job's life.
PUBLIC_STATUSES: tuple[str, ...] = tuple(
    dict.fromkeys(s.public for s in JobStatus)  # `cancelling` is shown as running
)


class Step(StrEnum):
    """Where a running job is (SPEC §3), each with the share of progress it covers."""

    VALIDATING = "validating"
    UPLOADING = "uploading"
    SUBMITTING = "submitting"
    QUEUED = "queued"
    PROCESSING = "processing"
    DOWNLOADING = "downloading"
    CLEANING_UP = "cleaning_up"
    FINALIZING = "finalizing"


STEP_PROGRESS: dict[Step, tuple[float, float]] = {
    Step.VALIDATING: (0.00, 0.05),
    Step.UPLOADING: (0.05, 0.15),
    Step.SUBMITTING: (0.15, 0.20),
    Step.QUEUED: (0.20, 0.20),
    Step.PROCESSING: (0.20, 0.90),
    Step.DOWNLOADING: (0.90, 0.97),
    Step.CLEANING_UP: (0.97, 0.99),
    Step.FINALIZING: (0.99, 1.00),
}


class TaskState(StrEnum):
    """One task = one remote batch. The states that own a side effect in progress
    (uploading, creating, downloading) carry an `owner`; a dead owner's claim is
    reconciled, never blindly repeated."""

    NEW = "new"  # nothing remote yet (also: back here to try again after a refusal)
    UPLOADING = "uploading"  # claimed; the input is being uploaded
    UPLOADED = "uploaded"  # input file uploaded; no batch yet
    CREATING = "creating"  # intent recorded (display name) before batches.create
    # The create was sent and nothing says whether the batch exists (no answer, a 5xx, its
    # sender died): only a complete listing of remote batches settles it, however long
    # Gemini stays unreachable. Holds a live batch (it may be one) and its uploaded input.
    CREATE_UNKNOWN = "create_unknown"
    SUBMITTED = "submitted"  # the remote batch exists: pending or running on Gemini
    SUCCEEDED = "succeeded"  # remote SUCCEEDED; results not downloaded yet
    DOWNLOADING = "downloading"  # claimed; results being streamed to disk
    DOWNLOADED = "downloaded"  # results on disk and verified key by key
    DONE = "done"  # downloaded and remote cleanup attempted
    FAILED = "failed"  # final: remote FAILED/EXPIRED, non-retryable error, or out of attempts
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TASK_TERMINAL


TASK_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
# Tasks that hold one of the live remote batches counted against the global limit.
TASK_LIVE = frozenset({TaskState.CREATING, TaskState.CREATE_UNKNOWN, TaskState.SUBMITTED})
# States whose side effect is in progress under a claim (an `owner`): a dead owner's claim
# is reconciled with the remote side, never blindly repeated.
TASK_CLAIMED = frozenset({TaskState.UPLOADING, TaskState.CREATING, TaskState.DOWNLOADING})
# Tasks that may be claimed to start (upload, or create from an upload already made).
TASK_CLAIMABLE = frozenset({TaskState.NEW, TaskState.UPLOADED})
# Tasks that count against the live-batch limit: live ones, and uploads in progress (their
# batch is created right after, so they have reserved a slot).
TASK_BUSY = TASK_LIVE | {TaskState.UPLOADING}


class RemoteState(StrEnum):
    """The SDK's names for a remote batch's state (the wire says BATCH_STATE_*)."""

    UNSPECIFIED = "JOB_STATE_UNSPECIFIED"
    PENDING = "JOB_STATE_PENDING"
    RUNNING = "JOB_STATE_RUNNING"
    SUCCEEDED = "JOB_STATE_SUCCEEDED"
    FAILED = "JOB_STATE_FAILED"
    CANCELLED = "JOB_STATE_CANCELLED"
    EXPIRED = "JOB_STATE_EXPIRED"

    @classmethod
    def parse(cls, value: Any) -> RemoteState:
        """Any spelling (`BATCH_STATE_RUNNING`, an SDK enum, `running`) -> RemoteState.
        Unknown states are UNSPECIFIED, which is never terminal: treat the unknown as
        still running, never as finished."""
        name = getattr(value, "name", value)
        if not isinstance(name, str):
            return cls.UNSPECIFIED
        name = name.upper().replace("BATCH_STATE_", "JOB_STATE_")
        if not name.startswith("JOB_STATE_"):
            name = "JOB_STATE_" + name
        try:
            return cls(name)
        except ValueError:
            return cls.UNSPECIFIED

    @property
    def terminal(self) -> bool:
        return self in REMOTE_TERMINAL


REMOTE_TERMINAL = frozenset(
    {RemoteState.SUCCEEDED, RemoteState.FAILED, RemoteState.CANCELLED, RemoteState.EXPIRED}
)


class ErrorClass(StrEnum):
    """Why something failed (SPEC §6); decides whether it is retried."""

    RATE_LIMITED = "RATE_LIMITED"  # 429
    SERVER_ERROR = "SERVER_ERROR"  # 5xx
    NETWORK = "NETWORK"  # connection refused/reset, DNS, TLS
    TIMEOUT = "TIMEOUT"
    EXPIRED = "EXPIRED"  # the remote batch expired (48 h) with no results
    BATCH_FAILED = "BATCH_FAILED"  # the remote batch ended FAILED
    INVALID_INPUT = "INVALID_INPUT"  # 400, or our own validation
    AUTH = "AUTH"  # 401/403, missing or bad key
    NOT_FOUND = "NOT_FOUND"  # 404 (unknown model, batch gone)
    DOWNLOAD = "DOWNLOAD"  # results cut short or not matching the input keys
    LOCAL_IO = "LOCAL_IO"  # disk full, permission denied on our side
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"  # a bug: reported, not retried


DEFAULT_RETRY_ON = (
    ErrorClass.RATE_LIMITED,
    ErrorClass.SERVER_ERROR,
    ErrorClass.NETWORK,
    ErrorClass.TIMEOUT,
)


class JobEvent(StrEnum):
    CREATE = "create"
    START = "start"  # work on the job begins (first claim)
    PROGRESS = "progress"  # any change that keeps the status
    WAIT = "wait"  # back to pending until a retry is due
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"
    CANCEL_DONE = "cancel_done"
    RETRY = "retry"  # a finished job gets new work (failed requests, failed tasks)
    DELETE = "delete"
    PRUNE = "prune"


class TaskEvent(StrEnum):
    CLAIM_UPLOAD = "claim_upload"
    UPLOADED = "uploaded"
    UPLOAD_FAILED = "upload_failed"
    CLAIM_CREATE = "claim_create"
    CREATED = "created"
    CREATE_FAILED = "create_failed"  # no batch was made (or, from create_unknown: none listed)
    CREATE_UNKNOWN = "create_unknown"  # the create's outcome is (still) unknown
    POLLED = "polled"
    REMOTE_SUCCEEDED = "remote_succeeded"
    REMOTE_ENDED = "remote_ended"  # FAILED, CANCELLED or EXPIRED remotely
    CLAIM_DOWNLOAD = "claim_download"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"
    CLEANED = "cleaned"
    RELEASE = "release"  # a dead owner's claim is handed back after reconciling
    CANCEL = "cancel"
    # Every key of the task is already in the job's results on disk while the ledger
    # (restored from a backup) still says it runs; never while its batch may be running.
    RECOVERED = "recovered"


S = JobStatus
# (from, event) -> to. `None` as `from` means "no job yet"; `None` as `to`: the job is
# removed. Any pair not listed is illegal: it changes nothing and is reported.
JOB_TRANSITIONS: dict[tuple[JobStatus | None, JobEvent], JobStatus | None] = {
    (None, JobEvent.CREATE): S.PENDING,
    (S.PENDING, JobEvent.START): S.RUNNING,
    (S.PENDING, JobEvent.PROGRESS): S.PENDING,
    (S.RUNNING, JobEvent.PROGRESS): S.RUNNING,
    (S.CANCELLING, JobEvent.PROGRESS): S.CANCELLING,
    (S.RUNNING, JobEvent.WAIT): S.PENDING,
    (S.RUNNING, JobEvent.SUCCEED): S.COMPLETED,
    (S.CANCELLING, JobEvent.SUCCEED): S.COMPLETED,  # success raced the cancel and won
    (S.PENDING, JobEvent.FAIL): S.FAILED,
    (S.RUNNING, JobEvent.FAIL): S.FAILED,
    (S.CANCELLING, JobEvent.FAIL): S.FAILED,
    (S.PENDING, JobEvent.CANCEL): S.CANCELLED,
    (S.RUNNING, JobEvent.CANCEL): S.CANCELLING,
    (S.CANCELLING, JobEvent.CANCEL): S.CANCELLING,
    (S.CANCELLING, JobEvent.CANCEL_DONE): S.CANCELLED,
    (S.COMPLETED, JobEvent.RETRY): S.PENDING,
    (S.FAILED, JobEvent.RETRY): S.PENDING,
    (S.CANCELLED, JobEvent.RETRY): S.PENDING,
    (S.PENDING, JobEvent.DELETE): None,
    (S.COMPLETED, JobEvent.DELETE): None,
    (S.FAILED, JobEvent.DELETE): None,
    (S.CANCELLED, JobEvent.DELETE): None,
    (S.COMPLETED, JobEvent.PRUNE): None,
    (S.FAILED, JobEvent.PRUNE): None,
    (S.CANCELLED, JobEvent.PRUNE): None,
}

T = TaskState
# (from, event) -> the states it may lead to (the caller picks one, e.g. retry or fail).
TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], frozenset[TaskState]] = {
    (T.NEW, TaskEvent.CLAIM_UPLOAD): frozenset({T.UPLOADING}),
    (T.UPLOADING, TaskEvent.UPLOADED): frozenset({T.UPLOADED}),
    (T.UPLOADING, TaskEvent.UPLOAD_FAILED): frozenset({T.NEW, T.FAILED}),
    (T.UPLOADING, TaskEvent.RELEASE): frozenset({T.NEW}),
    (T.UPLOADED, TaskEvent.CLAIM_CREATE): frozenset({T.CREATING}),
    (T.CREATING, TaskEvent.CREATED): frozenset({T.SUBMITTED}),
    # NEW: the uploaded input was deleted (a new attempt uploads again); UPLOADED: it is
    # still there and the next attempt creates from it.
    (T.CREATING, TaskEvent.CREATE_FAILED): frozenset({T.NEW, T.UPLOADED, T.FAILED}),
    (T.CREATING, TaskEvent.RELEASE): frozenset({T.NEW, T.UPLOADED}),
    (T.CREATING, TaskEvent.CANCEL): frozenset({T.CREATING}),  # outcome unknown: reconcile first
    (T.CREATING, TaskEvent.CREATE_UNKNOWN): frozenset({T.CREATE_UNKNOWN}),
    (T.CREATE_UNKNOWN, TaskEvent.CREATE_UNKNOWN): frozenset({T.CREATE_UNKNOWN}),  # looked again
    (T.CREATE_UNKNOWN, TaskEvent.CREATED): frozenset({T.SUBMITTED}),  # listed: it exists
    # A complete listing without it, begun once the create could no longer be in flight.
    (T.CREATE_UNKNOWN, TaskEvent.CREATE_FAILED): frozenset({T.UPLOADED, T.FAILED}),
    (T.CREATE_UNKNOWN, TaskEvent.CANCEL): frozenset({T.CREATE_UNKNOWN}),  # settle it first
    (T.SUBMITTED, TaskEvent.POLLED): frozenset({T.SUBMITTED}),
    (T.SUBMITTED, TaskEvent.REMOTE_SUCCEEDED): frozenset({T.SUCCEEDED}),
    (T.SUBMITTED, TaskEvent.REMOTE_ENDED): frozenset({T.FAILED, T.CANCELLED}),
    (T.SUCCEEDED, TaskEvent.CLAIM_DOWNLOAD): frozenset({T.DOWNLOADING}),
    (T.DOWNLOADING, TaskEvent.DOWNLOADED): frozenset({T.DOWNLOADED}),
    (T.DOWNLOADING, TaskEvent.DOWNLOAD_FAILED): frozenset({T.SUCCEEDED, T.FAILED}),
    (T.DOWNLOADING, TaskEvent.RELEASE): frozenset({T.SUCCEEDED}),
    (T.DOWNLOADED, TaskEvent.CLEANED): frozenset({T.DONE}),
    (T.NEW, TaskEvent.CANCEL): frozenset({T.CANCELLED}),
    (T.UPLOADED, TaskEvent.CANCEL): frozenset({T.CANCELLED}),
    (T.UPLOADING, TaskEvent.CANCEL): frozenset({T.UPLOADING}),  # finishes, then is cancelled
    (T.SUBMITTED, TaskEvent.CANCEL): frozenset({T.SUBMITTED, T.CANCELLED}),
    (T.SUCCEEDED, TaskEvent.CANCEL): frozenset({T.SUCCEEDED}),  # results exist: keep them
    (T.DOWNLOADING, TaskEvent.CANCEL): frozenset({T.DOWNLOADING}),
    (T.DOWNLOADED, TaskEvent.CANCEL): frozenset({T.DOWNLOADED}),
    **{
        (state, TaskEvent.RECOVERED): frozenset({T.DOWNLOADED})
        for state in (
            T.NEW,
            T.UPLOADING,
            T.UPLOADED,
            T.CREATING,
            T.CREATE_UNKNOWN,
            T.SUBMITTED,
            T.SUCCEEDED,
            T.DOWNLOADING,
        )
    },
}


class InvalidTransition(Exception):
    """A transition the table does not allow. Nothing was changed."""

    code = "INVALID_TRANSITION"

    def __init__(self, what: str, current: str | None, event: str, target: str | None = None):
        self.what, self.current, self.event, self.target = what, current, event, target
        to = f" to {target}" if target else ""
        super().__init__(f"{what} cannot go from {current or 'nothing'} by {event}{to}")


def job_transition(current: JobStatus | None, event: JobEvent) -> JobStatus | None:
    """The status after `event`, or InvalidTransition."""
    key = (current, event)
    if key not in JOB_TRANSITIONS:
        raise InvalidTransition("job", current, event)
    return JOB_TRANSITIONS[key]


def task_transition(current: TaskState, event: TaskEvent, target: TaskState) -> TaskState:
    """Check that `event` may take a task from `current` to `target`."""
    allowed = TASK_TRANSITIONS.get((current, event))
    if allowed is None or target not in allowed:
        raise InvalidTransition("task", current, event, target)
    return target


def legal_status_change(old: JobStatus | None, new: JobStatus | None) -> bool:
    """Whether some event takes a job from `old` to `new` (used by ledgers as a guard)."""
    if old == new:
        return True
    return any(src == old and dst == new for (src, _), dst in JOB_TRANSITIONS.items())


# --------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------


def now_iso(now: float | None = None) -> str:
    """UTC, ISO 8601 with microseconds and offset (what `datetime.isoformat` writes)."""
    return datetime.fromtimestamp(time.time() if now is None else now, tz=UTC).isoformat()


def parse_time(value: Any) -> float | None:
    """An ISO 8601 string (with or without offset; naive means local, as the original
    tool wrote it), a datetime, or epoch seconds -> epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None
    return None


def format_duration(seconds: float | None) -> str:
    """`3h 45m 30s`, `12m 5s`, `42s` (seed 000)."""
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return ""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass
class RequestCounts:
    """Per-request progress, from the batch's `batchStats` (or the verified results)."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done)

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "pending": self.pending,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RequestCounts:
        if not isinstance(data, dict):
            return cls()
        return cls(
            total=_int(data.get("total")),
            succeeded=_int(data.get("succeeded")),
            failed=_int(data.get("failed")),
        )

    def __add__(self, other: RequestCounts) -> RequestCounts:
        return RequestCounts(
            self.total + other.total, self.succeeded + other.succeeded, self.failed + other.failed
        )


@dataclass
class ErrorInfo:
    """An error as recorded (SPEC §6): code, message, class, step, attempt, at."""

    code: str
    message: str
    error_class: ErrorClass
    step: str | None = None
    attempt: int | None = None
    at: str | None = None
    retry_after: float | None = None
    task: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "class": self.error_class.value,
        }
        for name in ("step", "attempt", "at", "retry_after", "task"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ErrorInfo | None:
        if not isinstance(data, dict):
            return None
        try:
            error_class = ErrorClass(data.get("class", "INTERNAL"))
        except ValueError:
            error_class = ErrorClass.INTERNAL
        return cls(
            code=str(data.get("code", "")),
            message=str(data.get("message", "")),
            error_class=error_class,
            step=data.get("step"),
            attempt=data.get("attempt"),
            at=data.get("at"),
            retry_after=data.get("retry_after"),
            task=data.get("task"),
        )


@dataclass
class RetryConfig:
    """Seed 004's retry rules, per job."""

    max_attempts: int = 3
    retry_interval: float = 30.0  # seconds before the first retry; doubled each time
    retry_on_errors: tuple[ErrorClass, ...] = DEFAULT_RETRY_ON
    backoff_factor: float = 2.0
    max_interval: float = 1800.0
    jitter: float = 0.2
    retry_failed_requests: bool = False  # resubmit error lines automatically

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "retry_interval": self.retry_interval,
            "retry_on_errors": [e.value for e in self.retry_on_errors],
            "backoff_factor": self.backoff_factor,
            "max_interval": self.max_interval,
            "jitter": self.jitter,
            "retry_failed_requests": self.retry_failed_requests,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RetryConfig:
        """Build from a mapping; raises ValueError naming the bad field."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("retry_config must be an object")
        config = cls()
        known = set(config.to_dict())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"retry_config: unknown field(s) {', '.join(unknown)}")
        if "max_attempts" in data:
            config.max_attempts = _positive_int(data["max_attempts"], "max_attempts")
        for name in ("retry_interval", "backoff_factor", "max_interval", "jitter"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"retry_config.{name} must be a number >= 0")
                setattr(config, name, float(value))
        if "retry_on_errors" in data:
            values = data["retry_on_errors"]
            if not isinstance(values, list):
                raise ValueError("retry_config.retry_on_errors must be a list")
            try:
                config.retry_on_errors = tuple(ErrorClass(str(v).upper()) for v in values)
            except ValueError:
                names = ", ".join(e.value for e in ErrorClass)
                raise ValueError(
                    f"retry_config.retry_on_errors: unknown error class; use {names}"
                ) from None
        if "retry_failed_requests" in data:
            if not isinstance(data["retry_failed_requests"], bool):
                raise ValueError("retry_config.retry_failed_requests must be true or false")
            config.retry_failed_requests = data["retry_failed_requests"]
        return config


@dataclass
class TaskInput:
    """Where a task's requests come from: a byte range of lines of the job's input
    file, or a file gembatch wrote (the failed requests of an earlier attempt)."""

    path: str
    start: int = 0
    end: int | None = None  # exclusive; None = to the end of the file
    count: int = 0
    keys_from: int | None = None  # for retries: the task whose failed keys this holds

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "start": self.start, "count": self.count}
        if self.end is not None:
            data["end"] = self.end
        if self.keys_from is not None:
            data["keys_from"] = self.keys_from
        return data

    @classmethod
    def from_dict(cls, data: Any, fallback_path: str = "") -> TaskInput:
        if not isinstance(data, dict):
            return cls(path=fallback_path)
        end = data.get("end")
        return cls(
            path=str(data.get("path") or fallback_path),
            start=_int(data.get("start")),
            end=_int(end) if end is not None else None,
            count=_int(data.get("count")),
            keys_from=data.get("keys_from"),
        )


@dataclass
class Task:
    index: int
    attempt: int
    state: TaskState
    input: TaskInput
    display_name: str = ""
    uploaded_file_name: str | None = None
    batch_name: str | None = None
    batch: dict[str, Any] | None = None  # batch_to_dict() of the last remote view
    remote_state: RemoteState | None = None
    requests: RequestCounts = field(default_factory=RequestCounts)
    output_file: str | None = None
    part_file: str | None = None  # our verified copy of the results
    owner: dict[str, Any] | None = None  # who holds a claim (uploading/creating/downloading)
    # Epoch seconds: the next try of a failed step. On a finished task: when its remote
    # cleanup is due (set while something remote is left to delete, None once all is gone).
    not_before: float | None = None
    step_failures: int = 0  # transient failures of the current step
    error: ErrorInfo | None = None
    cleaned: dict[str, bool] = field(default_factory=dict)  # input_file / batch: deleted?
    created_at: str | None = None
    ended_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state in TASK_LIVE

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "index": self.index,
                "attempt": self.attempt,
                "state": self.state.value,
                "input": self.input.to_dict(),
                "display_name": self.display_name,
            }
        )
        optional = {
            "uploaded_file_name": self.uploaded_file_name,
            "batch_name": self.batch_name,
            "batch": self.batch,
            "remote_state": self.remote_state.value if self.remote_state else None,
            "output_file": self.output_file,
            "part_file": self.part_file,
            "owner": self.owner,
            "not_before": self.not_before,
            "error": self.error.to_dict() if self.error else None,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        data["requests"] = self.requests.to_dict()
        if self.step_failures:
            data["step_failures"] = self.step_failures
        if self.cleaned:
            data["cleaned"] = dict(self.cleaned)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], fallback_path: str = "") -> Task:
        known = {
            "index", "attempt", "state", "input", "display_name", "uploaded_file_name",
            "batch_name", "batch", "remote_state", "requests", "output_file", "part_file",
            "owner", "not_before", "step_failures", "error", "cleaned", "created_at",
            "ended_at",
        }  # fmt: skip
        remote = data.get("remote_state")
        return cls(
            index=_int(data.get("index")),
            attempt=max(1, _int(data.get("attempt"), 1)),
            state=TaskState(data.get("state", "new")),
            input=TaskInput.from_dict(data.get("input"), fallback_path),
            display_name=str(data.get("display_name") or ""),
            uploaded_file_name=data.get("uploaded_file_name"),
            batch_name=data.get("batch_name"),
            batch=data.get("batch"),
            remote_state=RemoteState.parse(remote) if remote else None,
            requests=RequestCounts.from_dict(data.get("requests")),
            output_file=data.get("output_file"),
            part_file=data.get("part_file"),
            owner=data.get("owner"),
            not_before=data.get("not_before"),
            step_failures=_int(data.get("step_failures")),
            error=ErrorInfo.from_dict(data.get("error")),
            cleaned=dict(data.get("cleaned") or {}),
            created_at=data.get("created_at"),
            ended_at=data.get("ended_at"),
            extra={k: v for k, v in data.items() if k not in known},
        )


# Fields a job record owns; everything else in a record is kept in `extra` untouched.
_JOB_FIELDS = {
    "id", "input_file", "input_path", "sha256", "size_bytes", "count", "model", "status",
    "step", "message", "progress", "priority", "tasks", "retry_config", "max_parallel_tasks",
    "result_file", "error", "errors", "attempts", "created_at", "updated_at",
    "completed_at", "final_state", "duration_seconds", "requests", "uploaded_file_name",
    "batch", "display_name_prefix",
}  # fmt: skip
MAX_ERRORS_KEPT = 20


@dataclass
class Job:
    """One user input (one JSONL file) processed to results; one or more tasks."""

    id: str
    input_file: str
    status: JobStatus = JobStatus.PENDING
    step: Step | None = None
    message: str = ""
    input_path: str | None = None  # absolute, resolved (duplicate detection by path)
    sha256: str | None = None  # of the input (duplicate detection by content)
    size_bytes: int = 0
    count: int = 0  # requests in the input (seed: `count`)
    model: str | None = None
    priority: int = 0
    tasks: list[Task] = field(default_factory=list)
    retry_config: RetryConfig = field(default_factory=RetryConfig)
    max_parallel_tasks: int | None = None
    result_file: str | None = None
    error: ErrorInfo | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    created_at: str | None = None
    updated_at: str | None = None
    completed_at: str | None = None
    final_state: str | None = None
    duration_seconds: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A record gembatch did not write (the original tool's): kept as-is where possible.
    foreign: bool = False

    # -- derived views ---------------------------------------------------------------
    @property
    def requests(self) -> RequestCounts:
        """Request counts over the job's input keys. A retry task holds keys that failed
        before: they leave "failed" and take the retry's outcome, so
        failed = sum(failed of every task) - sum(keys of every retry task)."""
        total = self.count or sum(t.input.count for t in self.tasks if t.input.keys_from is None)
        succeeded = sum(t.requests.succeeded for t in self.tasks)
        failed = sum(t.requests.failed for t in self.tasks)
        failed -= sum(t.input.count for t in self.tasks if t.input.keys_from is not None)
        succeeded = min(total, succeeded)
        return RequestCounts(total, succeeded, max(0, min(failed, total - succeeded)))

    @property
    def live_tasks(self) -> int:
        return sum(1 for t in self.tasks if t.live)

    @property
    def progress(self) -> float:
        """0..1 following the step ranges of SPEC §3."""
        if self.status is JobStatus.COMPLETED:
            return 1.0
        step = self.step or Step.QUEUED
        low, high = STEP_PROGRESS[step]
        if step is Step.PROCESSING:
            counts = self.requests
            share = counts.done / counts.total if counts.total else 0.0
            return round(low + (high - low) * share, 4)
        return low

    def task(self, index: int) -> Task:
        for task in self.tasks:
            if task.index == index:
                return task
        raise KeyError(f"job {self.id} has no task {index}")

    # -- records ---------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "input_file": self.input_file}
        record["count"] = self.count
        latest = self.tasks[-1] if self.tasks else None
        # Seed-002 fields, mirroring the latest task, so tools that read the original
        # format (uploaded_file_name, batch) keep working on gembatch's ledger.
        if latest and latest.uploaded_file_name:
            record["uploaded_file_name"] = latest.uploaded_file_name
        if latest and latest.batch:
            record["batch"] = latest.batch
        record.update(
            {
                "status": self.status.value,
                "step": self.step.value if self.step else None,
                "message": self.message,
                "progress": self.progress,
                "requests": self.requests.to_dict(),
                "input_path": self.input_path,
                "sha256": self.sha256,
                "size_bytes": self.size_bytes,
                "model": self.model,
                "priority": self.priority,
                "max_parallel_tasks": self.max_parallel_tasks,
                "retry_config": self.retry_config.to_dict(),
                "attempts": self.attempts,
                "result_file": self.result_file,
                "error": self.error.to_dict() if self.error else None,
                "errors": self.errors[-MAX_ERRORS_KEPT:],
                "tasks": [t.to_dict() for t in self.tasks],
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "completed_at": self.completed_at,
                "final_state": self.final_state,
                "duration_seconds": self.duration_seconds,
            }
        )
        for key, value in self.extra.items():
            record.setdefault(key, value)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        """A gembatch record, or one written by the original tool (v0.3.x: `batch`;
        v0.1.0: `job_name`), which becomes a job with one task."""
        if not isinstance(record.get("tasks"), list):
            return _from_foreign_record(record)
        tasks = [
            Task.from_dict(t, str(record.get("input_file", "")))
            for t in record["tasks"]
            if isinstance(t, dict)
        ]
        status = _status(record.get("status"))
        step = record.get("step")
        return cls(
            id=str(record["id"]),
            input_file=str(record.get("input_file", "")),
            status=status,
            step=Step(step) if step in Step._value2member_map_ else None,
            message=str(record.get("message") or ""),
            input_path=record.get("input_path"),
            sha256=record.get("sha256"),
            size_bytes=_int(record.get("size_bytes")),
            count=_int(record.get("count")),
            model=record.get("model"),
            priority=_int(record.get("priority")),
            tasks=tasks,
            retry_config=_retry_config(record.get("retry_config")),
            max_parallel_tasks=record.get("max_parallel_tasks"),
            result_file=record.get("result_file"),
            error=ErrorInfo.from_dict(record.get("error")),
            errors=list(record.get("errors") or []),
            attempts=_int(record.get("attempts")),
            created_at=record.get("created_at"),
            updated_at=record.get("updated_at"),
            completed_at=record.get("completed_at"),
            final_state=record.get("final_state"),
            duration_seconds=record.get("duration_seconds"),
            extra={k: v for k, v in record.items() if k not in _JOB_FIELDS},
        )


def _from_foreign_record(record: dict[str, Any]) -> Job:
    """The original tool's record: one batch, judged by its state (v0.3.x) or by
    `completed_at` (v0.1.0, seed 000)."""
    batch = record.get("batch") if isinstance(record.get("batch"), dict) else None
    batch_name = (batch or {}).get("name") or record.get("job_name")
    remote = RemoteState.parse((batch or {}).get("state") or record.get("final_state"))
    input_file = str(record.get("input_file", ""))
    task = Task(
        index=0,
        attempt=1,
        state=TaskState.SUBMITTED,
        input=TaskInput(path=input_file, count=_int(record.get("count"))),
        display_name=str((batch or {}).get("display_name") or record.get("display_name") or ""),
        uploaded_file_name=record.get("uploaded_file_name") or None,
        batch_name=batch_name,
        batch=batch,
        remote_state=remote,
        output_file=((batch or {}).get("dest") or {}).get("file_name"),
        created_at=record.get("created_at") or (batch or {}).get("create_time"),
    )
    status = JobStatus.RUNNING
    finished = bool(record.get("completed_at")) or remote.terminal
    if finished:
        # The original tool downloaded and cleaned up before recording these states.
        if remote is RemoteState.SUCCEEDED:
            task.state, status = TaskState.DONE, JobStatus.COMPLETED
        elif remote is RemoteState.CANCELLED:
            task.state, status = TaskState.CANCELLED, JobStatus.CANCELLED
        else:
            task.state, status = TaskState.FAILED, JobStatus.FAILED
        task.cleaned = {"input_file": True, "batch": True}
    known = {"input_file", "count", "uploaded_file_name", "batch", "job_name", "display_name"}
    return Job(
        id=str(record["id"]),
        input_file=input_file,
        status=status,
        step=None if finished else Step.PROCESSING,
        count=_int(record.get("count")),
        model=(batch or {}).get("model"),
        tasks=[task],
        created_at=record.get("created_at") or (batch or {}).get("create_time"),
        completed_at=record.get("completed_at"),
        final_state=record.get("final_state"),
        duration_seconds=record.get("duration_seconds"),
        extra={k: v for k, v in record.items() if k not in known and k not in _JOB_FIELDS},
        foreign=True,
    )


def _status(value: Any) -> JobStatus:
    try:
        return JobStatus(value)
    except ValueError:
        return JobStatus.PENDING


def _retry_config(value: Any) -> RetryConfig:
    try:
        return RetryConfig.from_dict(value)
    except ValueError:
        return RetryConfig()


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"retry_config.{name} must be an integer >= 1")
    return value
