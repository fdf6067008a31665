"""Pure job changes: (job, what happened) -> job, checked against the transition tables.

Why: every decision about a job (what step is next, whether an error is retried, whether
a transition is legal) must be made the same way by `submit`, `poll`, `retry`, `cancel`
and the HTTP service, and must be testable without servers. These functions do no I/O:
the engine performs a remote call, then hands the outcome to one of them inside a ledger
transaction, so the change is applied to the freshest record and never lost.
"""

from __future__ import annotations

import copy
import functools
import secrets
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from gembatch.jobs import (
    ErrorClass,
    ErrorInfo,
    InvalidTransition,
    Job,
    JobEvent,
    JobStatus,
    RemoteState,
    RequestCounts,
    RetryConfig,
    Step,
    Task,
    TaskEvent,
    TaskInput,
    TaskState,
    job_transition,
    now_iso,
    parse_time,
    task_transition,
)
from gembatch.retry import Decision, decide

F = TypeVar("F", bound=Callable[..., Job])


def _pure(reducer: F) -> F:
    """Reducers return a changed copy and never touch the job they were given."""

    @functools.wraps(reducer)
    def wrapper(job: Job, *args: Any, **kwargs: Any) -> Job:
        return reducer(copy.deepcopy(job), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# The step a task in each state shows; a job shows the least advanced of its tasks.
_STEP_OF_TASK: dict[TaskState, Step] = {
    TaskState.NEW: Step.VALIDATING,  # checked at submit, waiting for its upload
    TaskState.UPLOADING: Step.UPLOADING,
    TaskState.UPLOADED: Step.SUBMITTING,
    TaskState.CREATING: Step.SUBMITTING,
    TaskState.CREATE_UNKNOWN: Step.SUBMITTING,
    TaskState.SUBMITTED: Step.PROCESSING,
    TaskState.SUCCEEDED: Step.DOWNLOADING,
    TaskState.DOWNLOADING: Step.DOWNLOADING,
    TaskState.DOWNLOADED: Step.CLEANING_UP,
}
_STEP_ORDER = list(Step)


def new_job_id() -> str:
    return "j" + secrets.token_hex(8)  # 64 bits: no collision among millions of jobs


def display_name(job: Job, task: Task) -> str:
    """Unique per task attempt: how a create whose answer was lost is found again."""
    stem = job.input_file.rsplit("/", 1)[-1].removesuffix(".jsonl")[:60]
    return f"gembatch-{stem}-{job.id}-t{task.index}a{task.attempt}"


def new_job(
    *,
    job_id: str,
    input_file: str,
    input_path: str,
    sha256: str,
    size_bytes: int,
    count: int,
    plans: Iterable[tuple[int, int, int]],
    model: str,
    priority: int,
    retry_config: RetryConfig,
    max_parallel_tasks: int | None,
    result_file: str,
    now: float,
) -> Job:
    """A validated input, recorded as a pending job; `plans` are (start, end, count)."""
    job = Job(
        id=job_id,
        input_file=input_file,
        status=job_transition(None, JobEvent.CREATE) or JobStatus.PENDING,
        step=Step.VALIDATING,  # checked; "queued" means a remote batch is pending (SPEC §3)
        input_path=input_path,
        sha256=sha256,
        size_bytes=size_bytes,
        count=count,
        model=model,
        priority=priority,
        retry_config=retry_config,
        max_parallel_tasks=max_parallel_tasks,
        result_file=result_file,
        created_at=now_iso(now),
        updated_at=now_iso(now),
    )
    for index, (start, end, n) in enumerate(plans):
        task = Task(
            index=index,
            attempt=1,
            state=TaskState.NEW,
            input=TaskInput(path=input_path, start=start, end=end, count=n),
            requests=RequestCounts(total=n),
            created_at=now_iso(now),
        )
        task.display_name = display_name(job, task)
        job.tasks.append(task)
    job.message = _message(job, now)
    return job


# -- task steps -----------------------------------------------------------------------------


@_pure
def claim_upload(job: Job, index: int, owner: dict[str, Any], now: float) -> Job:
    task = job.task(index)
    _refuse_if_stopping(job, "upload")
    if task.not_before and task.not_before > now:
        raise InvalidTransition("task", task.state, "claim_upload (not due yet)")
    task.state = task_transition(task.state, TaskEvent.CLAIM_UPLOAD, TaskState.UPLOADING)
    task.owner = owner
    task.display_name = display_name(job, task)
    return settle(job, now)


@_pure
def renew_lease(
    job: Job, index: int, until: float, now: float | None = None, *, intent: bool = False
) -> Job:
    """The claim's holder is still working on it: its lease now ends at `until`. With
    `intent`, the create is about to be sent now (`intent_at` records when; a create whose
    sender vanished is then looked for as one whose outcome is unknown)."""
    task = job.task(index)
    if isinstance(task.owner, dict):
        task.owner = {**task.owner, "lease_until": until}
        if intent and now is not None:
            task.owner["intent_at"] = now_iso(now)
    return job


@_pure
def uploaded(job: Job, index: int, file_name: str, now: float) -> Job:
    task = job.task(index)
    task.state = task_transition(task.state, TaskEvent.UPLOADED, TaskState.UPLOADED)
    task.uploaded_file_name = file_name
    task.owner = None
    task.error = None
    task.step_failures = 0
    task.cleaned.pop("input_file", None)
    return settle(job, now)


@_pure
def claim_create(job: Job, index: int, owner: dict[str, Any], now: float) -> Job:
    """Record the intent (owner + display name) BEFORE batches.create is called."""
    task = job.task(index)
    _refuse_if_stopping(job, "create")
    task.state = task_transition(task.state, TaskEvent.CLAIM_CREATE, TaskState.CREATING)
    task.owner = {**owner, "intent_at": now_iso(now)}
    job.attempts = max(job.attempts, task.attempt)  # tried, whether or not Gemini accepts
    return settle(job, now)


@_pure
def created(
    job: Job, index: int, batch: dict[str, Any], now: float, *, name: str | None = None
) -> Job:
    """The batch exists remotely; record its name at once. `name`: the display name the
    batch was found by (a listing): refused if the task has moved on to another attempt."""
    task = job.task(index)
    if name is not None and task.display_name != name:
        raise InvalidTransition("task", task.state, f"created (found as {name})")
    task.state = task_transition(task.state, TaskEvent.CREATED, TaskState.SUBMITTED)
    task.extra.pop("create_unknown", None)
    task.batch_name = batch["name"]
    task.batch = batch
    task.remote_state = RemoteState.parse(batch.get("state"))
    task.owner = None
    task.error = None
    task.step_failures = 0
    task.not_before = None
    job.attempts = max(job.attempts, task.attempt)
    return settle(job, now)


@_pure
def step_failed(
    job: Job,
    index: int,
    event: TaskEvent,
    error: ErrorInfo,
    decision: Decision,
    now: float,
    *,
    input_deleted: bool = False,
) -> Job:
    """An upload, create or download failed: try again later (`decision.retry`) or give up.

    A failed create starts over from upload: the uploaded file was deleted (seed 001), and
    a new attempt gets a new display name, so a late-arriving create is never confused
    with the next one.
    """
    task = job.task(index)
    _record_error(job, error)
    task.error = error
    task.owner = None
    if event is TaskEvent.DOWNLOAD_FAILED:
        target = TaskState.SUCCEEDED if decision.retry else TaskState.FAILED
        task.step_failures += 1
    elif decision.retry:
        target = TaskState.NEW
        if event is TaskEvent.CREATE_FAILED and task.uploaded_file_name and not input_deleted:
            # Its delete failed (Gemini unreachable): the next attempt creates from it
            # rather than upload again and leave this one behind.
            target = TaskState.UPLOADED
    else:
        target = TaskState.FAILED
    task.state = task_transition(task.state, event, target)
    if event is TaskEvent.UPLOAD_FAILED:
        task.step_failures += 1
    if event is TaskEvent.CREATE_FAILED:
        if input_deleted:
            task.uploaded_file_name = None
            task.cleaned.pop("input_file", None)
        if decision.retry:
            task.attempt += 1
            task.display_name = display_name(job, task)
    if decision.retry:
        task.not_before = now + decision.delay
        _stop_if_cancelling(job, task, now)
    else:
        task.not_before = None
        task.ended_at = now_iso(now)
    return settle(job, now)


@_pure
def create_unknown(
    job: Job,
    index: int,
    now: float,
    *,
    look_at: float,
    since: float | None = None,
    why: str | None = None,
    error: ErrorInfo | None = None,
) -> Job:
    """The create's outcome is unknown (no answer, a 5xx, its sender died), or a look at
    the remote batches did not settle it (the listing failed, or began too early). Nothing
    is created again and the uploaded input is kept until a complete listing answers.

    Entering (from creating): `since` is the last moment the create may have been in flight
    (a listing counts only from `since` + the grace), `why` what happened, `error` the
    create's error, whose class decides a retry if no batch is found. Looking again: `error`
    is the failed listing's. `look_at`: when to list again."""
    task = job.task(index)
    entering = task.state is TaskState.CREATING
    task.state = task_transition(task.state, TaskEvent.CREATE_UNKNOWN, TaskState.CREATE_UNKNOWN)
    if entering:
        task.owner = None
        task.step_failures = 0
        task.extra["create_unknown"] = {
            "since": now if since is None else since,
            "why": why or "no answer",
            "class": error.error_class.value if error is not None else None,
        }
    elif error is not None:
        task.step_failures += 1
    if error is not None:
        task.error = error
        _record_error(job, error)
    task.not_before = look_at
    return settle(job, now)


@_pure
def create_not_made(
    job: Job, index: int, name: str, decision: Decision | None, now: float, note: str
) -> Job:
    """A complete listing, begun when the create could no longer land, has no batch named
    `name`: none was made. The uploaded input is kept: the next attempt creates from it
    (with `decision.delay`, a new attempt and display name; without a decision, the create
    was never answered at all: its sender died, and the same attempt goes on), or, when the
    decision gives up, the task fails and cleanup deletes the input."""
    task = job.task(index)
    if task.state is not TaskState.CREATE_UNKNOWN or task.display_name != name:
        raise InvalidTransition("task", task.state, f"create_not_made ({name})")
    task.extra.pop("create_unknown", None)
    task.owner = None
    task.step_failures = 0
    task.extra.setdefault("released", []).append({"at": now_iso(now), "note": note})
    if decision is not None and not decision.retry:
        task.state = task_transition(task.state, TaskEvent.CREATE_FAILED, TaskState.FAILED)
        task.not_before = None
        task.ended_at = now_iso(now)
        return settle(job, now)
    task.state = task_transition(task.state, TaskEvent.CREATE_FAILED, TaskState.UPLOADED)
    task.not_before = None
    if decision is not None:
        task.attempt += 1
        task.display_name = display_name(job, task)
        task.not_before = now + decision.delay
    _stop_if_cancelling(job, task, now)
    return settle(job, now)


def _stop_if_cancelling(job: Job, task: Task, now: float) -> None:
    """A task sent back to wait for a retry while its job is being cancelled ends now (no
    one would ever start it again)."""
    if job.status is JobStatus.CANCELLING and task.state in (TaskState.NEW, TaskState.UPLOADED):
        task.state = task_transition(task.state, TaskEvent.CANCEL, TaskState.CANCELLED)
        task.ended_at = now_iso(now)
        task.not_before = None


@_pure
def release(job: Job, index: int, target: TaskState, now: float, note: str) -> Job:
    """A dead owner's claim goes back to where work can resume (after reconciling)."""
    task = job.task(index)
    task.state = task_transition(task.state, TaskEvent.RELEASE, target)
    task.owner = None
    task.extra.setdefault("released", []).append({"at": now_iso(now), "note": note})
    if target is TaskState.NEW:
        task.uploaded_file_name = None
    return settle(job, now)


# -- remote progress ----------------------------------------------------------------------


@_pure
def polled(
    job: Job, index: int, batch: dict[str, Any], counts: RequestCounts | None, now: float
) -> Job:
    """What batches.get said. Only SUCCEEDED leads to a download; RUNNING is never done."""
    task = job.task(index)
    remote = RemoteState.parse(batch.get("state"))
    task.batch = batch
    task.remote_state = remote
    task.error = None
    task.step_failures = 0
    task.not_before = None
    if counts is not None and counts.total:
        task.requests = counts
    if remote is RemoteState.SUCCEEDED:
        task.state = task_transition(task.state, TaskEvent.REMOTE_SUCCEEDED, TaskState.SUCCEEDED)
        task.output_file = (batch.get("dest") or {}).get("file_name")
    elif remote in (RemoteState.FAILED, RemoteState.EXPIRED, RemoteState.CANCELLED):
        _remote_ended(job, task, remote, batch, now)
    else:
        task.state = task_transition(task.state, TaskEvent.POLLED, TaskState.SUBMITTED)
    return settle(job, now)


def _remote_ended(
    job: Job, task: Task, remote: RemoteState, batch: dict[str, Any], now: float
) -> None:
    task.ended_at = now_iso(now)
    if remote is RemoteState.CANCELLED:
        task.state = task_transition(task.state, TaskEvent.REMOTE_ENDED, TaskState.CANCELLED)
        if job.status is not JobStatus.CANCELLING:
            _record_error(
                job,
                ErrorInfo(
                    "CANCELLED",
                    f"batch {task.batch_name} was cancelled outside gembatch",
                    ErrorClass.CANCELLED,
                    step=Step.PROCESSING.value,
                    attempt=task.attempt,
                    at=now_iso(now),
                    task=task.index,
                ),
            )
        return
    error_class = ErrorClass.EXPIRED if remote is RemoteState.EXPIRED else ErrorClass.BATCH_FAILED
    detail = (batch.get("error") or {}).get("message") if isinstance(batch, dict) else None
    if remote is RemoteState.EXPIRED:
        message = f"batch {task.batch_name} expired after 48 h without results"
    else:
        message = f"batch {task.batch_name} failed" + (f": {detail}" if detail else "")
    error = ErrorInfo(
        remote.value,
        message,
        error_class,
        step=Step.PROCESSING.value,
        attempt=task.attempt,
        at=now_iso(now),
        task=task.index,
    )
    task.error = error
    task.state = task_transition(task.state, TaskEvent.REMOTE_ENDED, TaskState.FAILED)
    _record_error(job, error)
    if job.status is JobStatus.CANCELLING:
        return
    decision = decide(job.retry_config, error_class, task.attempt)
    if decision.retry:
        _replace(job, task, now + decision.delay, now)


def _replace(job: Job, old: Task, not_before: float, now: float) -> Task:
    """A new attempt of a task whose batch failed or expired: same requests, new batch."""
    task = Task(
        index=max(t.index for t in job.tasks) + 1,
        attempt=old.attempt + 1,
        state=TaskState.NEW,
        input=TaskInput(
            path=old.input.path,
            start=old.input.start,
            end=old.input.end,
            count=old.input.count,
            keys_from=old.input.keys_from,
        ),
        requests=RequestCounts(total=old.input.count),
        not_before=not_before,
        created_at=now_iso(now),
    )
    task.display_name = display_name(job, task)
    old.extra["replaced_by"] = task.index
    job.tasks.append(task)
    return task


@_pure
def poll_failed(job: Job, index: int, error: ErrorInfo, delay: float, now: float) -> Job:
    """batches.get failed. Shown and recorded, never fatal: the batch still exists and
    will report its own end (even a revoked key can be fixed). Only a batch that is gone
    (404) ends the task."""
    task = job.task(index)
    task.error = error
    _record_error(job, error)
    if error.error_class is ErrorClass.NOT_FOUND:
        task.state = task_transition(task.state, TaskEvent.REMOTE_ENDED, TaskState.FAILED)
        task.ended_at = now_iso(now)
    else:
        task.step_failures += 1
        task.not_before = now + delay
    return settle(job, now)


@_pure
def claim_download(job: Job, index: int, owner: dict[str, Any], now: float) -> Job:
    task = job.task(index)
    if task.not_before and task.not_before > now:
        raise InvalidTransition("task", task.state, "claim_download (not due yet)")
    task.state = task_transition(task.state, TaskEvent.CLAIM_DOWNLOAD, TaskState.DOWNLOADING)
    task.owner = owner
    return settle(job, now)


@_pure
def downloaded(job: Job, index: int, part_file: str, counts: RequestCounts, now: float) -> Job:
    """Results are on disk and every input key was accounted for."""
    task = job.task(index)
    task.state = task_transition(task.state, TaskEvent.DOWNLOADED, TaskState.DOWNLOADED)
    task.part_file = part_file
    task.requests = counts
    task.owner = None
    task.error = None
    task.step_failures = 0
    task.not_before = None
    return settle(job, now)


@_pure
def recovered(
    job: Job, index: int, counts: RequestCounts, batch_name: str | None, now: float, note: str
) -> Job:
    """Every key of the task is already in the job's result file (the ledger was restored
    from a backup taken before they arrived): nothing to submit or download again; the
    remote leftovers are cleaned up as after a download."""
    task = job.task(index)
    task.state = task_transition(task.state, TaskEvent.RECOVERED, TaskState.DOWNLOADED)
    task.batch_name = task.batch_name or batch_name
    task.part_file = None
    task.requests = counts
    task.owner = None
    task.error = None
    task.step_failures = 0
    task.not_before = None
    task.extra["merged"] = True  # its lines are in the result file already
    task.extra.setdefault("released", []).append({"at": now_iso(now), "note": note})
    return settle(job, now)


@_pure
def cleaned(
    job: Job,
    index: int,
    results: dict[str, bool],
    errors: list[str],
    now: float,
    retry_delay: float = 0.0,
) -> Job:
    """Remote cleanup was attempted; failures are recorded, never fatal, and tried again
    after `retry_delay` (the finished task's `not_before`) until nothing is left."""
    task = job.task(index)
    task.cleaned.update(results)
    if errors:
        task.extra["cleanup_errors"] = errors
        task.extra["cleanup_attempts"] = int(task.extra.get("cleanup_attempts", 0)) + 1
    else:
        task.extra.pop("cleanup_errors", None)
        task.extra.pop("cleanup_attempts", None)
    if task.state is TaskState.DOWNLOADED:
        task.state = task_transition(task.state, TaskEvent.CLEANED, TaskState.DONE)
        task.ended_at = task.ended_at or now_iso(now)
    if errors and task.state.terminal:
        task.not_before = now + retry_delay
    return settle(job, now)


def remote_leftovers(task: Task) -> dict[str, str]:
    """What a task left remotely that may now be deleted ({kind: name}; kinds: input_file,
    batch, output_file): nothing while its batch may still need it, and never the results
    of a failed download (the only copy is remote)."""
    if (
        task.state is TaskState.FAILED
        and task.error is not None
        and task.error.error_class in (ErrorClass.DOWNLOAD, ErrorClass.LOCAL_IO)
    ):
        return {}
    if task.state not in (
        TaskState.DOWNLOADED,
        TaskState.DONE,
        TaskState.FAILED,
        TaskState.CANCELLED,
    ):
        return {}
    names = {}
    if task.uploaded_file_name and not task.cleaned.get("input_file"):
        names["input_file"] = task.uploaded_file_name
    if task.batch_name and not task.cleaned.get("batch"):
        names["batch"] = task.batch_name
    if (
        task.output_file
        and task.state in (TaskState.DOWNLOADED, TaskState.DONE)
        and not task.cleaned.get("output_file")
    ):
        names["output_file"] = task.output_file
    if task.state is TaskState.DONE and not task.extra.get("cleanup_errors"):
        return {}  # cleaned when it was done (records older than `cleaned` lack the flags)
    return names


def remote_cleanup_pending(job: Job) -> int:
    """How many remote items the job's finished tasks still wait to have deleted (a
    finished task's `not_before` is set while its cleanup is due or being retried)."""
    return sum(len(remote_leftovers(t)) for t in job.tasks if t.state.terminal and t.not_before)


@_pure
def cancel_sent(job: Job, index: int, now: float) -> Job:
    job.task(index).extra["cancel_sent"] = now_iso(now)
    return settle(job, now)


@_pure
def mark_merged(job: Job, indexes: Iterable[int], now: float) -> Job:
    for index in indexes:
        job.task(index).extra["merged"] = True
    return settle(job, now)


# -- job-level ------------------------------------------------------------------------------


@_pure
def cancel(job: Job, now: float) -> Job:
    """Ask for a cancel. Tasks with nothing remote end at once; tasks with a remote batch
    end when Gemini confirms; results already produced are still collected."""
    status = job_transition(job.status, JobEvent.CANCEL)
    assert status is not None
    job.status = status
    for task in job.tasks:
        if task.state.terminal:
            continue
        if task.state in (TaskState.NEW, TaskState.UPLOADED):
            task.state = task_transition(task.state, TaskEvent.CANCEL, TaskState.CANCELLED)
            task.ended_at = now_iso(now)
            task.not_before = None
    if job.status is JobStatus.CANCELLING and not _unfinished(job):
        job.status = job_transition(job.status, JobEvent.CANCEL_DONE) or job.status
    return settle(job, now)


@_pure
def retry(job: Job, now: float, failed_keys_task: TaskInput | None = None) -> Job:
    """Give a finished job new work: its failed or cancelled tasks again, and/or a task
    holding the requests that failed inside a succeeded batch (`failed_keys_task`)."""
    if job.status not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidTransition("job", job.status, JobEvent.RETRY)
    added = False
    for task in list(job.tasks):
        unfinished_business = task.state in (TaskState.FAILED, TaskState.CANCELLED)
        if unfinished_business and "replaced_by" not in task.extra and task.input.count:
            if download_failed(task):
                _download_again(job, task, now)
            else:
                _replace(job, task, now, now)
            added = True
    if failed_keys_task is not None and failed_keys_task.count:
        task = Task(
            index=max(t.index for t in job.tasks) + 1,
            attempt=1 + max(t.attempt for t in job.tasks),
            state=TaskState.NEW,
            input=failed_keys_task,
            requests=RequestCounts(total=failed_keys_task.count),
            created_at=now_iso(now),
        )
        task.display_name = display_name(job, task)
        job.tasks.append(task)
        added = True
    if not added:
        raise InvalidTransition("job", job.status, "retry (nothing failed to retry)")
    job.status = job_transition(job.status, JobEvent.RETRY) or JobStatus.PENDING
    job.completed_at = None
    job.final_state = None
    job.duration_seconds = None
    job.error = None
    job = settle(job, now)
    if job.status is JobStatus.RUNNING:
        # A download to do again counts as started, but RETRY leads to pending (ledgers
        # refuse failed -> running in one write); claiming the download starts the job.
        job.status = JobStatus.PENDING
    return job


def download_failed(task: Task) -> bool:
    """A task whose batch succeeded but whose results never reached the disk (the
    download kept being cut, the disk was full): its results exist only remotely."""
    return (
        task.state is TaskState.FAILED
        and task.remote_state is RemoteState.SUCCEEDED
        and bool(task.output_file)
        and task.error is not None
        and task.error.error_class in (ErrorClass.DOWNLOAD, ErrorClass.LOCAL_IO)
    )


def _download_again(job: Job, old: Task, now: float) -> Task:
    """`retry` of a failed download: a new task that starts at the download of the same
    batch (already paid for), not a new batch. It takes over the batch, its input and
    output files (their cleanup is its own now) and the batch's request counts."""
    task = Task(
        index=max(t.index for t in job.tasks) + 1,
        attempt=old.attempt,
        state=TaskState.SUCCEEDED,
        input=copy.deepcopy(old.input),
        requests=old.requests,
        created_at=now_iso(now),
    )
    task.display_name = old.display_name  # the batch's own name (reconcile looks it up)
    task.uploaded_file_name = old.uploaded_file_name
    task.batch_name = old.batch_name
    task.batch = copy.deepcopy(old.batch)
    task.remote_state = old.remote_state
    task.output_file = old.output_file
    task.cleaned = dict(old.cleaned)
    old.requests = RequestCounts(total=old.input.count)  # counted once, by the new task
    old.extra["replaced_by"] = task.index
    job.tasks.append(task)
    return task


@_pure
def finalize(job: Job, now: float, *, results_complete: bool) -> Job:
    """Every task is finished and the results file is written: end the job."""
    if _unfinished(job):
        raise InvalidTransition("job", job.status, "finalize (tasks still running)")
    effective = [t for t in job.tasks if "replaced_by" not in t.extra]
    if job.status is JobStatus.CANCELLING or (
        any(t.state is TaskState.CANCELLED for t in effective) and not results_complete
    ):
        event, final_state = JobEvent.CANCEL_DONE, RemoteState.CANCELLED.value
        if job.status is not JobStatus.CANCELLING:
            job.status = job_transition(job.status, JobEvent.CANCEL) or job.status
        if results_complete and all(t.state is TaskState.DONE for t in effective):
            event, final_state = JobEvent.SUCCEED, RemoteState.SUCCEEDED.value
    elif results_complete and all(t.state is TaskState.DONE for t in effective):
        event, final_state = JobEvent.SUCCEED, RemoteState.SUCCEEDED.value
    else:
        event = JobEvent.FAIL
        failed = [t for t in effective if t.state is TaskState.FAILED]
        remote = next((t.remote_state for t in failed if t.remote_state), None)
        final_state = (remote or RemoteState.FAILED).value
        if remote is None or remote is RemoteState.SUCCEEDED:
            final_state = RemoteState.FAILED.value
    if job.status is JobStatus.PENDING:
        job.status = job_transition(job.status, JobEvent.START) or job.status
    job.status = job_transition(job.status, event) or job.status
    job.final_state = final_state
    job.completed_at = now_iso(now)
    started = parse_time(job.created_at)
    job.duration_seconds = int(now - started) if started is not None else None
    job.step = Step.FINALIZING if job.status is JobStatus.COMPLETED else job.step
    if job.status is JobStatus.COMPLETED:
        job.error = None  # errors recovered from stay in `errors`, not shown as the job's
    job.updated_at = now_iso(now)
    job.message = _message(job, now)
    return job


def settle(job: Job, now: float) -> Job:
    """Recompute the job's status and step from its tasks, through legal transitions."""
    job.updated_at = now_iso(now)
    for task in job.tasks:
        if task.state.terminal:
            # A finished task's `not_before` says when its remote cleanup is due: set while
            # something is left to delete (the ledger finds such jobs by it), else cleared.
            if not remote_leftovers(task):
                task.not_before = None
            elif task.not_before is None:
                task.not_before = now
    if job.status.terminal:
        job.message = _message(job, now)
        return job
    active = [t for t in job.tasks if not t.state.terminal]
    if job.status is not JobStatus.CANCELLING:
        started = any(t.state is not TaskState.NEW for t in active)
        if started and job.status is JobStatus.PENDING:
            job.status = job_transition(job.status, JobEvent.START) or job.status
        elif active and not started and job.status is JobStatus.RUNNING:
            job.status = job_transition(job.status, JobEvent.WAIT) or job.status
    steps = [_task_step(t) for t in active]
    if steps:
        job.step = min(steps, key=_STEP_ORDER.index)
    else:  # every task has ended: finalizing, unless a failure ends the job where it was
        job.step = _failed_step(job) or Step.FINALIZING
    job.message = _message(job, now)
    return job


def _failed_step(job: Job) -> Step | None:
    """The step at which a job whose tasks have all ended failed (seed 003 shows a failed
    job at its step and progress), or None when it will not fail: no task failed for good,
    or the job is being cancelled. With several failed tasks, the first to fail decides."""
    effective = [t for t in job.tasks if "replaced_by" not in t.extra]
    failed = [t for t in effective if t.state is TaskState.FAILED]
    cancelled = any(t.state is TaskState.CANCELLED for t in effective)
    if not failed or cancelled or job.status is JobStatus.CANCELLING:
        return None  # `finalize` completes or cancels such a job
    first = min(failed, key=lambda t: (t.ended_at or "", t.index))
    step = first.error.step if first.error is not None else None
    return Step(step) if step in Step._value2member_map_ else job.step


def needs_finalize(job: Job) -> bool:
    return not job.status.terminal and bool(job.tasks) and not _unfinished(job)


def _unfinished(job: Job) -> bool:
    return any(not t.state.terminal for t in job.tasks)


def _task_step(task: Task) -> Step:
    step = _STEP_OF_TASK.get(task.state, Step.QUEUED)
    if task.state is TaskState.SUBMITTED and task.remote_state in (None, RemoteState.PENDING):
        return Step.QUEUED
    return step


def _refuse_if_stopping(job: Job, what: str) -> None:
    if job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
        raise InvalidTransition("job", job.status, f"{what} (the job is being cancelled)")
    if job.status.terminal:
        raise InvalidTransition("job", job.status, what)


def _record_error(job: Job, error: ErrorInfo) -> None:
    job.error = error
    job.errors.append(error.to_dict())


def _message(job: Job, now: float) -> str:
    counts = job.requests
    if job.status is JobStatus.COMPLETED:
        failed = f", {counts.failed} failed" if counts.failed else ""
        return f"completed: {counts.succeeded} of {counts.total} requests succeeded{failed}"
    if job.status is JobStatus.FAILED:
        return f"failed: {job.error.message}" if job.error else "failed"
    if job.status is JobStatus.CANCELLED:
        return "cancelled"
    if job.status is JobStatus.CANCELLING:
        return "cancelling: waiting for Gemini to confirm"
    unknown = [t for t in job.tasks if t.state is TaskState.CREATE_UNKNOWN]
    if unknown:
        why = (unknown[0].extra.get("create_unknown") or {}).get("why")
        why = f" ({why})" if why else ""
        return f"create outcome unknown{why}: waiting for Gemini to list batches"
    waiting = [t for t in job.tasks if t.state is TaskState.NEW and t.not_before]
    if waiting and all(t.not_before and t.not_before > now for t in waiting):
        delay = min(t.not_before for t in waiting if t.not_before) - now
        reason = job.error.message if job.error else "waiting"
        return f"retry in {max(0, int(delay))} s ({reason})"
    step = job.step or Step.QUEUED
    if step is Step.PROCESSING:
        return f"processing: {counts.done} of {counts.total} requests done"
    return step.value.replace("_", " ")
