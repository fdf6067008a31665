"""The engine: runs every job's tasks through upload, create, wait, download and cleanup.

Why: this is where "nothing lost, nothing paid twice" is kept. Each remote side effect is
bracketed by ledger transactions: the intent (with its owner) is recorded before the call
and the outcome right after, so a crash at any instant leaves a record that says what to
check. A create whose outcome is unknown is resolved by listing remote batches by display
name, never by creating again. Results are verified key by key before anything remote is
deleted. The engine talks to its ledger only through `apply`/`transact` (changes are pure
functions from `reducers`), and to Gemini only through `Remote`; the CLI and the HTTP
service drive the same engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gembatch import fsutil
from gembatch.engine import reducers
from gembatch.engine.owner import current_owner, is_mine, owner_alive
from gembatch.failpoints import failpoint
from gembatch.gemini.errors import Classified, classify, error_info
from gembatch.gemini.remote import Remote
from gembatch.inputs import ValidatedInput, iter_keys, open_range, write_subset
from gembatch.jobs import (
    ErrorClass,
    InvalidTransition,
    Job,
    JobStatus,
    RemoteState,
    RequestCounts,
    RetryConfig,
    Step,
    TaskEvent,
    TaskInput,
    TaskState,
    now_iso,
)
from gembatch.ledger import Record
from gembatch.results import failed_keys, key_outcomes, merge_results, verify_output
from gembatch.retry import Decision, backoff, decide

Change = Callable[[Record], Record | None]
WORK_DIR = ".gembatch"

_log = logging.getLogger(__name__)


class EngineLedger(Protocol):
    """What the engine needs from a ledger (JsonlLedger and the SQL ledger provide it).

    - `load()`: every record (a snapshot with `records` and `problems`).
    - `add_many(records)`: append new records; one bool per record (False: id taken).
    - `apply({job_id: change})`: run each change on the freshest record in one
      transaction; the result has `records`, `errors` and `missing` by job id.
    - `transact(select)`: `select(records)` picks the changes (and, returning a pair,
      new records) inside the same transaction.
    - `find_by_id(job_id)`: one record or None, finished jobs included (`retry` works on
      finished jobs, which `load_active` leaves out).

    Optional, used when present:
    - `load_active()`: like `load`, without finished jobs (what each cycle works on).
    - `load_cleanup_pending()`: the finished jobs with remote cleanup still to do (a
      finished task whose `not_before` is set), which each cycle retries when due.
    - `claim_starts(select, max_busy=, now=)`: like `transact`, but the ledger hands
      `select` only the jobs that may start a task and the count of busy tasks as
      `busy` (the SQL ledger locks just those rows); `select(records, busy)` returns the
      claims as in `transact`.
    """

    def load(self) -> Any: ...

    def add_many(self, records: Sequence[Record]) -> list[bool]: ...

    def apply(self, changes: Mapping[str, Change]) -> Any: ...

    def transact(self, select: Callable[[list[Record]], Mapping[str, Change]]) -> Any: ...

    def find_by_id(self, job_id: str) -> Record | None: ...


@dataclass
class EngineSettings:
    max_live_batches: int = 10  # remote batches pending or running at once (Gemini: 100)
    poll_concurrency: int = 32
    upload_concurrency: int = 4
    download_concurrency: int = 4
    max_download_attempts: int = 5
    download_retry_interval: float = 5.0
    # A remote delete that failed is tried again after this (doubled each time, up to
    # cleanup_max_interval) until it is done: nothing is left behind for good.
    cleanup_retry_interval: float = 5.0
    cleanup_max_interval: float = 300.0
    # First backoff after a failed batches.get, or a failed listing that looks for a create
    # whose outcome is unknown (doubled up to 60 s for those).
    poll_retry_interval: float = 5.0
    # Several processes on one database (the service on PostgreSQL): a claim is a lease
    # that its holder renews; once it has expired another process may take the task over
    # (the holder's late writes are then refused). None: claims last while their process
    # lives (one machine: a dead pid is seen at once).
    lease_seconds: float | None = None
    # How long a create may still land after its sender stopped waiting for it (a timeout,
    # a cut connection, the sender died or stalled): a listing that does not show its batch
    # settles "not made" only if it began at least this long after that moment. Until then
    # the task stays create_unknown and is looked for again, never created again.
    create_grace_seconds: float = 10.0
    # The longest a create may go on at Gemini after it was sent when no answer came back
    # (a connection cut or reset): the SDK asks the server to give up after the request
    # timeout (X-Server-Timeout), 120 s by default. None: the Remote's own timeout. A
    # listing counts as "not made" only after this too, so a create still running there
    # is never answered with a second one.
    create_request_timeout: float | None = None


@dataclass
class AddResult:
    input: ValidatedInput
    job: Job | None = None  # the new job, when added
    existing: Job | None = None  # the job it duplicates, when skipped
    reason: str = ""
    note: str = ""  # something the user should know about the new job (its results file)


@dataclass
class StartOutcome:
    job_id: str
    task: int
    input_file: str
    ok: bool
    message: str
    batch_name: str | None = None
    retry_at: float | None = None
    unknown: bool = False  # the create's outcome is unknown: a listing will settle it


@dataclass
class CycleReport:
    polled: int = 0
    started: list[StartOutcome] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # job ids that became terminal
    errors: list[tuple[str, str]] = field(default_factory=list)  # (job id, message)
    next_due: float | None = None  # earliest time some deferred work becomes due
    unfinished: int = 0
    cleanup_pending: int = 0  # remote items of finished tasks still to delete (retried)


class Engine:
    def __init__(
        self,
        ledger: EngineLedger,
        remote: Remote,
        settings: EngineSettings | None = None,
        *,
        role: str = "engine",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        generation: int = 0,
    ) -> None:
        self.ledger = ledger
        self.remote = remote
        self.settings = settings or EngineSettings()
        # The ledger's restore generation: a claim recorded under another generation (in a
        # backup since restored) belongs to no live process, whatever its pid says.
        self.generation = generation
        self.owner = {**current_owner(role), "generation": generation}
        self.clock = clock
        self.rng = rng or random.Random()
        self.problems: list[str] = []
        self._restore_checked = generation == 0
        self._held: dict[tuple[str, int], Any] = {}  # (job, task) -> claim being worked on

    # -- reading -----------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        """Every job in the ledger; records that cannot be read are noted in `problems`."""
        return self._jobs_from(self.ledger.load())

    def _jobs_from(self, snapshot: Any, *, note: bool = True) -> list[Job]:
        """The jobs of a snapshot; with `note`, what cannot be read becomes `problems`."""
        jobs, problems = [], [f"line {p.line}: {p.message}" for p in snapshot.problems]
        for record in snapshot.records:
            try:
                jobs.append(Job.from_record(record))
            except (KeyError, ValueError, TypeError) as exc:
                problems.append(f"job {record.get('id')}: unreadable record ({exc})")
        if note:
            self.problems = problems
        return jobs

    def active_jobs(self) -> list[Job]:
        """Unfinished jobs only: what each cycle works on (a service's ledger may hold
        years of finished ones)."""
        load = getattr(self.ledger, "load_active", self.ledger.load)
        return self._jobs_from(load())

    async def _jobs(self) -> list[Job]:
        return await asyncio.to_thread(self.active_jobs)

    async def _apply(self, changes: Mapping[str, Change]) -> Any:
        return await asyncio.to_thread(self.ledger.apply, changes)

    def _change(
        self,
        reducer: Callable[..., Job],
        *args: Any,
        fence: tuple[int, Any] | None = None,
        **kwargs: Any,
    ) -> Change:
        """A ledger change that runs `reducer(job, *args)` on the freshest record. With
        `fence=(task index, claim)`, only while that claim still holds the task: a write
        that comes after the lease was lost (and the task taken over) changes nothing."""
        # The job is built fresh from the record here, so the reducer may change it in
        # place: skip the defensive copy that keeps reducers pure for other callers.
        body = getattr(reducer, "__wrapped__", reducer)

        def change(record: Record) -> Record:
            job = Job.from_record(record)
            if fence is not None:
                _check_fence(job, *fence)
            return body(job, *args, **kwargs).to_record()

        return change

    def _claim_owner(self) -> dict[str, Any]:
        """The owner recorded with a claim: this engine, a nonce for this claim, and the
        lease's end when claims are leases."""
        owner = {**self.owner, "claim": secrets.token_hex(4)}
        if self.settings.lease_seconds:
            owner["lease_until"] = self.clock() + self.settings.lease_seconds
        return owner

    async def heartbeat(self) -> int:
        """Renew the leases of the claims this engine is working on; returns how many."""
        if not self.settings.lease_seconds or not self._held:
            return 0
        held = dict(self._held)
        until = self.clock() + self.settings.lease_seconds
        changes: dict[str, list[Change]] = {}
        for (job_id, index), claim in held.items():
            changes.setdefault(job_id, []).append(
                self._change(reducers.renew_lease, index, until, fence=(index, claim))
            )
        result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
        lost = set(result.errors) | set(result.missing)
        for (job_id, index), claim in held.items():
            if job_id in lost and self._held.get((job_id, index)) == claim:
                self._held.pop((job_id, index), None)  # taken over: stop renewing it
        return len(held) - sum(1 for job_id, _ in held if job_id in lost)

    def _renewed(self, job: Job, index: int, now: float) -> dict[str, Any]:
        """The task's owner (this claim) with its lease counted from `now`: the one recorded
        at the claim may have run out during a long upload (heartbeats renew the ledger's
        copy, not this one)."""
        owner = dict(job.task(index).owner or {})
        if self.settings.lease_seconds:
            owner["lease_until"] = now + self.settings.lease_seconds
        return owner

    def _hold(self, job: Job, index: int) -> Any:
        claim = (job.task(index).owner or {}).get("claim")
        self._held[(job.id, index)] = claim
        return claim

    def _release_hold(self, job_id: str, index: int) -> None:
        self._held.pop((job_id, index), None)

    # -- submit ------------------------------------------------------------------------------
    def add_jobs(
        self,
        inputs: Sequence[ValidatedInput],
        *,
        model: str,
        priority: int = 0,
        retry_config: RetryConfig | None = None,
        max_parallel_tasks: int | None = None,
        force: bool = False,
        job_ids: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        result_files: Sequence[str] | None = None,
    ) -> list[AddResult]:
        """Record validated inputs as pending jobs; the same input (by path or by content)
        is not submitted twice unless `force`. `job_ids`, `result_files` (one per input)
        and `extra` (fields kept in every new record, e.g. a service's `user_id`) are for
        callers that name jobs themselves."""
        results: list[AddResult] = []

        def select(records: list[Record]) -> tuple[Mapping[str, Change], list[Record]]:
            existing = []
            for record in records:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    existing.append(Job.from_record(record))
            now = self.clock()
            new_records = []
            for position, item in enumerate(inputs):
                duplicate = None if force else _duplicate_of(item, existing)
                if duplicate is not None:
                    results.append(AddResult(item, existing=duplicate, reason=_why(duplicate)))
                    continue
                job_id = job_ids[position] if job_ids else reducers.new_job_id()
                note = ""
                if result_files:
                    result_file = result_files[position]
                else:
                    result_file, note = _own_results_path(item.path, job_id, existing)
                job = reducers.new_job(
                    job_id=job_id,
                    input_file=item.display,
                    input_path=str(item.path),
                    sha256=item.sha256,
                    size_bytes=item.size_bytes,
                    count=item.count,
                    plans=[(t.start, t.end, t.count) for t in item.tasks],
                    model=model
                    if model.startswith(("models/", "tunedModels/"))
                    else f"models/{model}",
                    priority=priority,
                    retry_config=retry_config or RetryConfig(),
                    max_parallel_tasks=max_parallel_tasks,
                    result_file=result_file,
                    now=now,
                )
                job.extra.update(extra or {})
                existing.append(job)
                new_records.append(job.to_record())
                results.append(AddResult(item, job=job, note=note))
            return {}, new_records

        if force and result_files:
            # No duplicate check and the caller names the results files: no need to read
            # (possibly thousands of) jobs.
            self.ledger.add_many(select([])[1])
        else:
            self.ledger.transact(select)
        return results

    # -- one cycle ---------------------------------------------------------------------------
    async def cycle(self, *, start: bool = True) -> CycleReport:
        """One pass over the ledger: reconcile, start, poll, download, clean up, finalize."""
        report = CycleReport()
        before = {j.id for j in await self._jobs()}
        if not self._restore_checked:
            await self.recover_after_restore(report)
        await self.reconcile(report)
        if start:
            report.started = await self.start()
            report.errors += [(o.job_id, o.message) for o in report.started if not o.ok]
        await self.poll(report)
        await self.download(report)
        await self.cleanup_finished(report)
        await self.finalize(report)
        left = await self._cleanup_left_behind(report)
        jobs = await self._jobs()
        report.finished = sorted(before - {j.id for j in jobs})
        report.unfinished = len(jobs)
        due = [t.not_before for j in [*jobs, *left] for t in j.tasks if t.not_before]
        report.next_due = min(due) if due else None
        report.cleanup_pending = sum(reducers.remote_cleanup_pending(j) for j in [*jobs, *left])
        return report

    # -- reconcile ---------------------------------------------------------------------------
    async def reconcile(self, report: CycleReport) -> None:
        """Hand back claims whose owner died (a create becomes one whose outcome is
        unknown), then settle unknown creates by listing the remote batches."""
        jobs = await self._jobs()
        stale = [
            (job, task)
            for job in jobs
            for task in job.tasks
            if task.state in (TaskState.UPLOADING, TaskState.CREATING, TaskState.DOWNLOADING)
            and not is_mine(task.owner, self.owner)
            and self._stale(task.owner)
        ]
        if stale:
            await self._release_stale(report, stale)
            jobs = await self._jobs()
        await self._settle_unknown_creates(report, jobs)

    async def _release_stale(self, report: CycleReport, stale: list[tuple[Job, Any]]) -> None:
        now = self.clock()
        uploading = {t.display_name for _, t in stale if t.state is TaskState.UPLOADING}
        try:
            found_files = await self.remote.find_files(uploading) if uploading else {}
        except Exception as exc:  # try again next cycle; never guess
            report.errors.append(("", f"reconcile: {classify(exc).message}"))
            stale = [(job, task) for job, task in stale if task.state is not TaskState.UPLOADING]
            found_files = {}
        changes: dict[str, list[Change]] = {}
        for job, task in stale:
            fence = _fence(job, task.index)
            if task.state is TaskState.CREATING:
                # Its create may have been sent, and may be in flight still (a holder that
                # stalled, a request inside Gemini): the grace counts from now, the first
                # moment its sender is known to have stopped waiting.
                change = self._change(
                    reducers.create_unknown,
                    task.index,
                    now,
                    look_at=now,
                    since=now,
                    why="its process stopped before the outcome was recorded",
                    fence=fence,
                )
            elif task.state is TaskState.UPLOADING:
                orphan = found_files.get(task.display_name)
                if orphan:
                    with contextlib.suppress(Exception):
                        await self.remote.delete_file(orphan)
                change = self._change(
                    reducers.release,
                    task.index,
                    TaskState.NEW,
                    now,
                    "upload of a dead process",
                    fence=fence,
                )
            else:
                change = self._change(
                    reducers.release,
                    task.index,
                    TaskState.SUCCEEDED,
                    now,
                    "download of a dead process",
                    fence=fence,
                )
            changes.setdefault(job.id, []).append(change)
        result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
        _report_apply_errors(result, report)

    async def _settle_unknown_creates(self, report: CycleReport, jobs: list[Job]) -> None:
        """Look for the batches of creates whose outcome is unknown, in ONE complete listing
        (every page: a listing that fails anywhere changes nothing). Listed: the task has
        its batch. Not listed by a listing begun at least `create_grace_seconds` after the
        create could last have been in flight: none was made, and only now may another
        create be sent. Anything else (Gemini unreachable for hours, a listing begun too
        early): the task stays unknown and is looked for again, with backoff."""
        now = self.clock()
        due = [
            (job, task)
            for job in jobs
            for task in job.tasks
            if task.state is TaskState.CREATE_UNKNOWN
            and (task.not_before is None or task.not_before <= now)
        ]
        if not due:
            return
        begun = self.clock()
        changes: dict[str, list[Change]] = {}
        try:
            found = await self.remote.find_batches({t.display_name for _, t in due})
        except Exception as exc:
            classified = classify(exc)
            now = self.clock()
            for job, task in due:
                info = error_info(
                    dataclasses.replace(
                        classified,
                        message="create outcome unknown, and listing the remote batches "
                        f"failed: {_headline(classified)}",
                    ),
                    step=Step.SUBMITTING.value,
                    attempt=task.attempt,
                    task=task.index,
                    now=now,
                )
                delay = max(classified.retry_after or 0.0, self._look_backoff(task))
                change = self._change(
                    reducers.create_unknown, task.index, now, look_at=now + delay, error=info
                )
                changes.setdefault(job.id, []).append(
                    _while_unknown(change, task.index, task.display_name)
                )
                report.errors.append((job.id, f"{job.input_file}: {info.message}"))
            result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
            _report_apply_errors(result, report)
            return
        now = self.clock()
        grace = self.settings.create_grace_seconds
        for job, task in due:
            batch = found.get(task.display_name)
            unknown = task.extra.get("create_unknown") or {}
            since = unknown.get("since")
            settles_at = (since if isinstance(since, int | float) else now) + grace
            if batch is not None:
                change = self._change(
                    reducers.created, task.index, batch.to_batch_dict(), now, name=task.display_name
                )
            elif begun < settles_at:
                # The create may still land: "not listed" means nothing yet. Look again
                # meanwhile (it may appear), and once more when the grace is over.
                look_at = min(settles_at, now + self._look_backoff(task))
                change = self._change(reducers.create_unknown, task.index, now, look_at=look_at)
            else:
                decision = None
                if unknown.get("class") in ErrorClass._value2member_map_:
                    decision = decide(
                        job.retry_config, ErrorClass(unknown["class"]), task.attempt, None, self.rng
                    )
                change = self._change(
                    reducers.create_not_made,
                    task.index,
                    task.display_name,
                    decision,
                    now,
                    f"no batch named {task.display_name} in a complete listing",
                )
            changes.setdefault(job.id, []).append(
                _while_unknown(change, task.index, task.display_name)
            )
        result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
        _report_apply_errors(result, report)

    def _look_backoff(self, task: Any) -> float:
        config = RetryConfig(retry_interval=self.settings.poll_retry_interval, max_interval=60.0)
        return backoff(config, task.step_failures + 1, self.rng)

    async def recover_after_restore(self, report: CycleReport) -> None:
        """After `gembatch db restore`, the ledger may say "to do" for work that finished
        after the backup was taken: its results are in the job's result file and its
        remote batch and files may be gone. Such tasks are recognised once, before
        anything is submitted again (never pay twice). Tasks whose batch may still be
        running are left to the poll, which recovers them if the batch is gone."""
        recoverable = (
            TaskState.NEW,
            TaskState.UPLOADING,
            TaskState.UPLOADED,
            TaskState.CREATING,
            TaskState.CREATE_UNKNOWN,
            TaskState.SUCCEEDED,
            TaskState.DOWNLOADING,
        )
        found: list[tuple[Job, Any, RequestCounts]] = []
        for job in await self._jobs():
            outcomes: dict[str, bool] | None = None
            for task in job.tasks:
                if task.state not in recoverable:
                    continue
                if outcomes is None:
                    outcomes = await asyncio.to_thread(_result_outcomes, job)
                counts = await asyncio.to_thread(_covered, task, outcomes)
                if counts is not None:
                    found.append((job, task, counts))
        if found:
            creating = {
                t.display_name
                for _, t, _ in found
                if t.state in (TaskState.CREATING, TaskState.CREATE_UNKNOWN)
            }
            try:
                batches = await self.remote.find_batches(creating) if creating else {}
            except Exception as exc:  # try again next cycle; never guess
                report.errors.append(("", f"restore check: {classify(exc).message}"))
                return
            now = self.clock()
            changes: dict[str, list[Change]] = {}
            for job, task, counts in found:
                batch = batches.get(task.display_name)
                if batch is not None and not batch.state.terminal:
                    continue  # a live batch: reconcile records it; its results merge later
                change = self._change(
                    reducers.recovered,
                    task.index,
                    counts,
                    batch.name if batch is not None else None,
                    now,
                    "every key already in the result file (ledger restored from a backup)",
                )
                changes.setdefault(job.id, []).append(change)
            if changes:
                result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
                _report_apply_errors(result, report)
        self._restore_checked = True

    def _stale(self, owner: Any) -> bool:
        """Whether a claim's owner is gone: recorded before a restore, its lease expired
        (it may be paused or cut off: its late writes will be refused), or it is a dead
        process on this host (seen at once, without waiting for the lease)."""
        if isinstance(owner, dict) and owner.get("generation", 0) != self.generation:
            return True
        lease = owner.get("lease_until") if isinstance(owner, dict) else None
        if isinstance(lease, (int, float)) and lease < self.clock():
            return True
        return not owner_alive(owner)

    # -- start: upload + create --------------------------------------------------------------
    async def start(
        self, job_ids: Collection[str] | None = None, gate: asyncio.Semaphore | None = None
    ) -> list[StartOutcome]:
        """Upload and create batches for due tasks, highest priority first, while fewer
        than `max_live_batches` remote batches are live and within each job's
        `max_parallel_tasks`. `gate` bounds concurrent uploads and creates; give one to
        share it between concurrent calls (the service starts in the background)."""
        claimed = await asyncio.to_thread(self._claim_starts, job_ids)
        if not claimed:
            return []
        gate = gate or asyncio.Semaphore(self.settings.upload_concurrency)
        # Every claim is renewed from now on, also while it waits for the gate: a claim
        # left to expire in the queue would be taken over by another process while this
        # one still means to work on it.
        for job, index in claimed:
            self._hold(job, index)

        async def run(job: Job, index: int) -> StartOutcome:
            try:
                async with gate:
                    return await self._upload_and_create(job, index)
            finally:
                self._release_hold(job.id, index)

        return list(await asyncio.gather(*(run(job, index) for job, index in claimed)))

    def _claim_starts(self, job_ids: Collection[str] | None) -> list[tuple[Job, int]]:
        claimed: list[tuple[Job, int]] = []
        now = self.clock()

        def select(records: list[Record], busy: int | None = None) -> Mapping[str, Change]:
            jobs = []
            for record in records:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    jobs.append(Job.from_record(record))
            # An upload in progress has reserved a slot: its batch is created right after.
            if busy is None:  # `records` are all the active jobs: count from them
                busy = sum(
                    1 for j in jobs for t in j.tasks if t.live or t.state is TaskState.UPLOADING
                )
            free = self.settings.max_live_batches - busy
            candidates = []
            for job in jobs:
                if job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
                    continue
                if job_ids is not None and job.id not in job_ids:
                    continue
                busy_tasks = [t for t in job.tasks if t.live or t.state is TaskState.UPLOADING]
                room = (job.max_parallel_tasks or 1_000_000) - len(busy_tasks)
                budget = _InFlight(job, busy_tasks)
                for task in job.tasks:
                    if room <= 0:
                        break
                    due = not task.not_before or task.not_before <= now
                    if task.state in (TaskState.NEW, TaskState.UPLOADED) and due:
                        if not budget.admit(task):
                            break  # FIFO within the job: later tasks wait their turn
                        candidates.append((-job.priority, job.created_at or "", task.index, job))
                        room -= 1
            candidates.sort(key=lambda c: c[:3])
            changes: dict[str, list[Change]] = {}
            for _, _, index, job in candidates[: max(0, free)]:
                task = job.task(index)
                if task.state is TaskState.NEW:
                    change = self._change(reducers.claim_upload, index, self._claim_owner(), now)
                else:
                    change = self._change(reducers.claim_create, index, self._claim_owner(), now)
                changes.setdefault(job.id, []).append(change)
                claimed.append((job, index))
            return {jid: _chain(fs) for jid, fs in changes.items()}

        claim = getattr(self.ledger, "claim_starts", None)
        if claim is not None and job_ids is None:  # SQL: read only the jobs it may take
            result = claim(select, max_busy=self.settings.max_live_batches, now=now)
        else:
            result = self.ledger.transact(select)
        ok = set(result.records) - set(result.errors)
        return [(Job.from_record(result.records[j.id]), i) for j, i in claimed if j.id in ok]

    async def _upload_and_create(self, job: Job, index: int) -> StartOutcome:
        task = job.task(index)
        if task.state is TaskState.UPLOADING:
            uploaded = await self._upload(job, index)
            if isinstance(uploaded, StartOutcome):
                return uploaded
            now = self.clock()
            # Uploaded and create intent in ONE write: no instant where the task looks
            # free to another process (which could then exceed the live-batch limit).
            claim = await self._apply(
                {
                    job.id: _chain(
                        [
                            self._change(
                                reducers.uploaded, index, uploaded, now, fence=_fence(job, index)
                            ),
                            self._change(
                                reducers.claim_create, index, self._renewed(job, index, now), now
                            ),
                        ]
                    )
                }
            )
            if job.id not in claim.records or job.id in claim.errors:
                # Not ours any more (lease lost, job deleted): the file is nobody's.
                with contextlib.suppress(Exception):
                    await self.remote.delete_file(uploaded)
                message = str(claim.errors.get(job.id, "job vanished from the ledger"))
                return StartOutcome(job.id, index, job.input_file, False, message)
            job = Job.from_record(claim.records[job.id])
        elif not await self._still_mine(job, index, intent=True):
            # The claim waited for its turn and was taken over meanwhile: creating now
            # could pay twice (the process that took over creates its own).
            return StartOutcome(
                job.id, index, job.input_file, False, "claim taken over before the create"
            )
        return await self._create(job, index)

    async def _still_mine(self, job: Job, index: int, *, intent: bool = False) -> bool:
        """Whether this engine's claim (as `job` recorded it) still holds the task, its
        lease renewed by the check: a remote side effect that only the holder may cause
        (a create, deleting the task's uploaded file) is safe for a whole lease after."""
        fence = _fence(job, index)
        if fence is None or not self.settings.lease_seconds:
            return True  # claims without leases are taken over only from dead processes
        now = self.clock()
        until = now + self.settings.lease_seconds
        change = self._change(reducers.renew_lease, index, until, now, intent=intent, fence=fence)
        result = await self._apply({job.id: change})
        return job.id in result.records and job.id not in result.errors

    async def _upload(self, job: Job, index: int) -> str | StartOutcome:
        """The task's byte range of the input, streamed up; the new file's name."""
        task = job.task(index)
        try:
            end = task.input.end
            if end is None:
                end = os.path.getsize(task.input.path)
            with open_range(task.input.path, task.input.start, end) as source:
                return await self.remote.upload(source, end - task.input.start, task.display_name)
        except FileNotFoundError as exc:
            # Gone from under the job (a database restored without its data directory, a
            # file deleted by hand): trying again cannot help until it is put back.
            missing = Classified(
                ErrorClass.LOCAL_IO,
                "INPUT_MISSING",
                f"the input file {exc.filename or task.input.path} is missing: put it back "
                "(a restored database needs the data directory backed up with it), then "
                "retry the job",
            )
            return await self._step_failed(
                job, index, TaskEvent.UPLOAD_FAILED, Step.UPLOADING, missing
            )
        except Exception as exc:
            return await self._step_failed(
                job, index, TaskEvent.UPLOAD_FAILED, Step.UPLOADING, classify(exc)
            )

    async def _create(self, job: Job, index: int) -> StartOutcome:
        task = job.task(index)
        assert task.uploaded_file_name and job.model
        failpoint("create.before_call")
        sent = self.clock()
        try:
            batch = await self.remote.create_batch(
                job.model, task.uploaded_file_name, task.display_name
            )
            failpoint("create.after_answer")
        except Exception as exc:
            classified = classify(exc)
            if not classified.definitive:
                # The create may have happened: never create again before a listing says.
                return await self._create_unknown(job, index, classified, sent)
            deleted = False
            # Only while the claim holds: a process that took the task over may be
            # creating its batch from this very file.
            if await self._still_mine(job, index):
                with contextlib.suppress(Exception):
                    deleted = await self.remote.delete_file(task.uploaded_file_name) or True
            return await self._step_failed(
                job,
                index,
                TaskEvent.CREATE_FAILED,
                Step.SUBMITTING,
                classified,
                input_deleted=deleted,
            )
        return await self._created(job, index, batch.to_batch_dict())

    async def _create_unknown(
        self, job: Job, index: int, classified: Classified, sent: float
    ) -> StartOutcome:
        """A create that may or may not have made its batch: one look right away (a reply
        lost after the batch was made is found at once), else the task is recorded as
        create_unknown for the cycles to settle. Its uploaded input stays: the batch, if
        it exists, reads it."""
        task = job.task(index)
        gave_up = self.clock()  # a create still in flight lands after this, if at all
        if classified.http_status is None:
            # No answer at all (a cut connection): the server may still be working on it
            # until its own timeout, counted from when the request was sent.
            limit = self.settings.create_request_timeout
            if limit is None:
                limit = float(getattr(self.remote, "timeout", 120.0))
            gave_up = max(gave_up, sent + limit)
        with contextlib.suppress(Exception):  # a failed look is the cycle's to repeat
            found = (await self.remote.find_batches({task.display_name})).get(task.display_name)
            if found is not None:
                return await self._created(job, index, found.to_batch_dict())
        now = self.clock()
        info = error_info(
            classified, step=Step.SUBMITTING.value, attempt=task.attempt, task=index, now=now
        )
        result = await self._apply(
            {
                job.id: self._change(
                    reducers.create_unknown,
                    index,
                    now,
                    look_at=now,
                    since=gave_up,
                    why=_headline(classified),
                    error=info,
                    fence=_fence(job, index),
                )
            }
        )
        if job.id in result.errors:
            message = str(result.errors[job.id])
        else:
            message = (
                f"create outcome unknown ({_headline(classified)}): the remote batches are "
                "listed before any new create"
            )
        return StartOutcome(job.id, index, job.input_file, False, message, unknown=True)

    async def _created(self, job: Job, index: int, batch: dict[str, Any]) -> StartOutcome:
        result = await self._apply(
            {
                job.id: self._change(
                    reducers.created, index, batch, self.clock(), fence=_fence(job, index)
                )
            }
        )
        ok = job.id in result.records and job.id not in result.errors
        message = f"submitted {batch['name']}" if ok else str(result.errors.get(job.id))
        return StartOutcome(job.id, index, job.input_file, ok, message, batch_name=batch["name"])

    async def _step_failed(
        self,
        job: Job,
        index: int,
        event: TaskEvent,
        step: Step,
        classified: Classified,
        *,
        input_deleted: bool = False,
    ) -> StartOutcome:
        task = job.task(index)
        # Creates count against the job's attempts; uploads and downloads have their own
        # counters, so a flaky network never uses up the user's retry budget.
        attempts = task.attempt if event is TaskEvent.CREATE_FAILED else task.step_failures + 1
        config = job.retry_config
        if event is TaskEvent.DOWNLOAD_FAILED:
            config = RetryConfig(
                max_attempts=self.settings.max_download_attempts,
                retry_interval=self.settings.download_retry_interval,
                retry_on_errors=(*config.retry_on_errors, ErrorClass.DOWNLOAD, ErrorClass.LOCAL_IO),
            )
        decision = decide(
            config, classified.error_class, attempts, classified.retry_after, self.rng
        )
        info = error_info(
            classified, step=step.value, attempt=task.attempt, task=index, now=self.clock()
        )
        now = self.clock()
        await self._apply(
            {
                job.id: self._change(
                    reducers.step_failed,
                    index,
                    event,
                    info,
                    decision,
                    now,
                    input_deleted=input_deleted,
                    fence=_fence(job, index),
                )
            }
        )
        message = f"{_headline(classified)} ({decision.reason})"
        retry_at = now + decision.delay if decision.retry else None
        return StartOutcome(job.id, index, job.input_file, False, message, retry_at=retry_at)

    # -- poll --------------------------------------------------------------------------------
    async def poll(self, report: CycleReport) -> None:
        """batches.get for every live task at once (bounded by the Remote's concurrency);
        every outcome goes into ONE ledger write."""
        now = self.clock()
        jobs = await self._jobs()
        targets = [
            (job, task)
            for job in jobs
            for task in job.tasks
            if task.state is TaskState.SUBMITTED
            and task.batch_name
            and (not task.not_before or task.not_before <= now)
        ]
        await self._send_cancels(report, jobs)
        if not targets:
            return
        results = await asyncio.gather(
            *(self.remote.get_batch(task.batch_name) for _, task in targets),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        now = self.clock()
        changes: dict[str, list[Change]] = {}
        for (job, task), result in zip(targets, results, strict=True):
            if getattr(result, "code", None) == 404:
                counts = await asyncio.to_thread(
                    lambda j=job, t=task: _covered(t, _result_outcomes(j))
                )
                if counts is not None:  # gone, but its results are safe: restored ledger
                    change = self._change(
                        reducers.recovered, task.index, counts, None, now,
                        "batch gone and every key already in the result file",
                    )  # fmt: skip
                    changes.setdefault(job.id, []).append(change)
                    continue
            if isinstance(result, BaseException):
                classified = classify(result)
                if classified.error_class is ErrorClass.NOT_FOUND:
                    classified = dataclasses.replace(
                        classified,
                        message=f"batch {task.batch_name} no longer exists (deleted outside "
                        f"gembatch?): {classified.message}; `gembatch retry "
                        f"{job.input_file}` submits its requests again",
                    )
                info = error_info(
                    classified,
                    step=Step.PROCESSING.value,
                    attempt=task.attempt,
                    task=task.index,
                    now=now,
                )
                delay = max(
                    classified.retry_after or 0.0,
                    backoff(
                        RetryConfig(
                            retry_interval=self.settings.poll_retry_interval, max_interval=300.0
                        ),
                        task.step_failures + 1,
                        self.rng,
                    ),
                )
                change = self._change(reducers.poll_failed, task.index, info, delay, now)
                report.errors.append((job.id, f"{job.input_file}: {_headline(classified)}"))
            else:
                seen = result.to_batch_dict()
                if _unchanged(task, seen):
                    continue  # nothing moved: no write (most cycles of a long wait)
                change = self._change(reducers.polled, task.index, seen, result.counts, now)
            changes.setdefault(job.id, []).append(change)
        report.polled += len(targets)
        if changes:
            outcome = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
            _report_apply_errors(outcome, report)

    async def _send_cancels(self, report: CycleReport, jobs: list[Job] | None = None) -> None:
        """Cancel remotely every live batch of a cancelling job that has not been cancelled
        yet (e.g. one whose create was in flight when the user cancelled)."""
        pending = [
            (job, task)
            for job in (jobs if jobs is not None else await self._jobs())
            if job.status is JobStatus.CANCELLING
            for task in job.tasks
            if task.state is TaskState.SUBMITTED
            and task.batch_name
            and not task.extra.get("cancel_sent")
        ]
        if not pending:
            return
        changes: dict[str, list[Change]] = {}
        for job, task in pending:
            try:
                await self.remote.cancel_batch(task.batch_name)  # type: ignore[arg-type]
            except Exception as exc:
                error = classify(exc)
                # Not found: nothing is left to cancel (another process finished this
                # cancel and deleted the batch, or Gemini did). The poll settles the task.
                if error.error_class is not ErrorClass.NOT_FOUND:
                    report.errors.append((job.id, f"{job.input_file}: cancel: {error.message}"))
                    continue
            changes.setdefault(job.id, []).append(
                self._change(reducers.cancel_sent, task.index, self.clock())
            )
        if changes:
            await self._apply({jid: _chain(fs) for jid, fs in changes.items()})

    # -- download ----------------------------------------------------------------------------
    async def download(self, report: CycleReport) -> None:
        now = self.clock()
        claims: dict[str, list[Change]] = {}
        targets = []
        for job in await self._jobs():
            for task in job.tasks:
                if task.state is TaskState.SUCCEEDED and (
                    not task.not_before or task.not_before <= now
                ):
                    claims.setdefault(job.id, []).append(
                        self._change(reducers.claim_download, task.index, self._claim_owner(), now)
                    )
                    targets.append((job.id, task.index))
        if not targets:
            return
        result = await self._apply({jid: _chain(fs) for jid, fs in claims.items()})
        gate = asyncio.Semaphore(self.settings.download_concurrency)
        mine = [
            (Job.from_record(result.records[job_id]), index)
            for job_id, index in targets
            if job_id in result.records and job_id not in result.errors
        ]
        for job, index in mine:  # renewed while they wait for the gate, too
            self._hold(job, index)

        async def run(job: Job, index: int) -> None:
            try:
                async with gate:
                    message = await self._download_task(job, index)
            finally:
                self._release_hold(job.id, index)
            if message:
                report.errors.append((job.id, message))

        await asyncio.gather(*(run(job, index) for job, index in mine))

    async def _download_task(self, job: Job, index: int) -> str | None:
        """Stream the results beside their destination, verify every key, then rename.
        An interrupted or incomplete download never leaves a file under the final name."""
        task = job.task(index)
        part = part_path(job, task)
        try:
            if not task.output_file:
                raise _DownloadIncomplete("the batch succeeded but names no output file")
            part.parent.mkdir(parents=True, exist_ok=True)
            expected = await asyncio.to_thread(_expected_keys, task)
            with fsutil.atomic_writer(part) as handle:
                size = await self.remote.download(task.output_file, handle)
                handle.flush()
                if size and _last_byte(handle.name) != b"\n":
                    handle.write(b"\n")  # a complete last line without its newline
                    handle.flush()
                verdict = await asyncio.to_thread(verify_output, Path(handle.name), expected)
                if not verdict.ok:
                    raise _DownloadIncomplete(verdict.describe())
        except Exception as exc:
            classified = (
                Classified(ErrorClass.DOWNLOAD, "DOWNLOAD_INCOMPLETE", str(exc))
                if isinstance(exc, _DownloadIncomplete)
                else classify(exc)
            )
            if classified.error_class is ErrorClass.LOCAL_IO:
                classified = _local_io_advice(classified, exc, part, job)
            outcome = await self._step_failed(
                job, index, TaskEvent.DOWNLOAD_FAILED, Step.DOWNLOADING, classified
            )
            return f"{job.input_file}: download failed: {outcome.message}"
        counts = RequestCounts(
            total=verdict.succeeded + verdict.failed,
            succeeded=verdict.succeeded,
            failed=verdict.failed,
        )
        result = await self._apply(
            {
                job.id: self._change(
                    reducers.downloaded,
                    index,
                    str(part),
                    counts,
                    self.clock(),
                    fence=_fence(job, index),
                )
            }
        )
        if job.id in result.errors:
            part.unlink(missing_ok=True)  # not ours to record: whoever took over downloads
            return f"{job.input_file}: {result.errors[job.id]}"
        return None

    # -- cleanup -----------------------------------------------------------------------------
    async def cleanup_finished(
        self, report: CycleReport, jobs: list[Job] | None = None, *, due_only: bool = True
    ) -> None:
        """Delete the remote input and batch of tasks whose results are safe on disk, and of
        tasks that ended without results. Never for a download that failed: its results
        still exist only remotely. A delete that fails is tried again, with backoff, until
        it is done (gone already counts as done). `jobs`: these (default: the unfinished
        ones); `due_only=False` tries every leftover now, whatever its backoff."""
        now = self.clock()
        targets = []
        for job in jobs if jobs is not None else await self._jobs():
            for task in job.tasks:
                names = cleanup_targets(task, now if due_only else None)
                if names or task.state is TaskState.DOWNLOADED:
                    targets.append((job, task, names))
        if not targets:
            return

        async def run(task_names: dict[str, str]) -> tuple[dict[str, bool], list[str]]:
            done, errors = {}, []
            for kind, name in task_names.items():
                try:
                    if kind == "batch":
                        await self.remote.delete_batch(name)
                    else:
                        await self.remote.delete_file(name)
                    done[kind] = True
                except Exception as exc:
                    done[kind] = False
                    errors.append(f"delete {name}: {classify(exc).message}")
            return done, errors

        outcomes = await asyncio.gather(*(run(names) for _, _, names in targets))
        now = self.clock()
        changes: dict[str, list[Change]] = {}
        for (job, task, _), (done, errors) in zip(targets, outcomes, strict=True):
            attempts = int(task.extra.get("cleanup_attempts", 0)) + 1
            config = RetryConfig(
                retry_interval=self.settings.cleanup_retry_interval,
                max_interval=self.settings.cleanup_max_interval,
            )
            delay = backoff(config, attempts, self.rng)
            changes.setdefault(job.id, []).append(
                self._change(reducers.cleaned, task.index, done, errors, now, delay)
            )
            report.errors += [(job.id, f"{job.input_file}: cleanup: {e}") for e in errors]
        result = await self._apply({jid: _chain(fs) for jid, fs in changes.items()})
        _report_apply_errors(result, report)

    async def _cleanup_left_behind(self, report: CycleReport) -> list[Job]:
        """Finished jobs whose remote cleanup failed: their due deletes are tried again
        (each cycle otherwise looks at unfinished jobs only). Returns those still waiting."""
        load = getattr(self.ledger, "load_cleanup_pending", None)
        if load is None:
            return []
        left = self._jobs_from(await asyncio.to_thread(load), note=False)
        if left:
            await self.cleanup_finished(report, left)
            left = self._jobs_from(await asyncio.to_thread(load), note=False)
        return left

    # -- finalize ----------------------------------------------------------------------------
    async def finalize(self, report: CycleReport) -> None:
        for job in await self._jobs():
            if not reducers.needs_finalize(job):
                continue
            try:
                await self._finalize_job(job)
            except Exception as exc:
                report.errors.append((job.id, f"{job.input_file}: finalize: {exc}"))

    async def _finalize_job(self, job: Job) -> None:
        merged_before = [t for t in job.tasks if t.extra.get("merged")]
        new_parts = [
            t for t in job.tasks if t.state is TaskState.DONE and not t.extra.get("merged")
        ]
        result_file = Path(job.result_file or results_path(Path(job.input_file)))
        lines = None
        # Crash-safe in any order of events: the parts are removed only after the ledger
        # says they are merged, so a finalize that stops before its ledger write (a kill,
        # another server finalizing the same job) is simply done again.
        paths = [Path(t.part_file) for t in new_parts if t.part_file]
        present = [p for p in paths if p.exists()]
        if present and not await asyncio.to_thread(
            _link_single_part, present, paths, result_file, merged_before
        ):
            # The result file holds what earlier finalizes merged, or (a finalize that
            # stopped before its ledger write) some of these parts already: merged again,
            # still one line per key.
            earlier = result_file.exists() and (merged_before or len(present) < len(paths))
            base = [result_file] if earlier else []
            await asyncio.to_thread(merge_results, base + present, result_file)
        # With no part left at all, an earlier finalize put them in the result file and
        # stopped before its ledger write (older versions moved a single part there): the
        # count of its lines says whether it is whole.
        if result_file.exists():
            lines = await asyncio.to_thread(_count_lines, result_file)
        complete = lines is not None and lines == job.count
        now = self.clock()
        indexes = [t.index for t in new_parts]

        def change(record: Record) -> Record:
            fresh = Job.from_record(record)
            fresh = reducers.mark_merged(fresh, indexes, now)
            fresh.result_file = str(result_file) if result_file.exists() else fresh.result_file
            return reducers.finalize(fresh, now, results_complete=complete).to_record()

        result = await self._apply({job.id: change})
        if job.id in result.errors:
            raise result.errors[job.id]
        for path in paths:  # merged, and the ledger says so
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty: other jobs' parts may be there
            work_dir(job).rmdir()
        finished = Job.from_record(result.records[job.id])
        if (
            finished.status is JobStatus.COMPLETED
            and finished.requests.failed
            and finished.retry_config.retry_failed_requests
            and sum(1 for t in finished.tasks if t.input.keys_from is not None)
            < finished.retry_config.max_attempts - 1
        ):
            await self.retry(finished.id)

    # -- user actions ------------------------------------------------------------------------
    async def cancel(self, job_id: str, report: CycleReport | None = None) -> Job:
        """Cancel a job: pending work stops now; live batches are cancelled remotely and the
        job ends when Gemini confirms (results already produced are still collected).

        A remote cancel that fails (network, 5xx) does not undo the cancel: the job stays
        cancelling and every cycle sends what was not sent. What went wrong is added to
        `report` when one is given, else logged."""
        result = await self._apply({job_id: self._change(reducers.cancel, self.clock())})
        if job_id in result.errors:
            raise result.errors[job_id]
        if job_id not in result.records:
            raise KeyError(job_id)
        job = Job.from_record(result.records[job_id])
        sent = CycleReport()
        await self._send_cancels(sent, [job])  # this job's only: others are the cycle's
        for _, message in sent.errors:
            if report is not None:
                report.errors.append((job_id, message))
            else:
                _log.warning("job %s: %s (retried by the next cycle)", job_id, message)
        return job

    async def retry(self, job_id: str) -> Job:
        """New work for a finished job: failed or cancelled tasks get new batches, and the
        requests that failed inside a succeeded batch go into one new task."""
        # Finished jobs are what retry is for: look the job up itself (active_jobs leaves
        # finished ones out).
        record = await asyncio.to_thread(self.ledger.find_by_id, job_id)
        if record is None:
            raise KeyError(job_id)
        job = Job.from_record(record)
        failed_input = None
        if job.status is JobStatus.COMPLETED and job.result_file and Path(job.result_file).exists():
            keys = await asyncio.to_thread(failed_keys, Path(job.result_file))
            if keys:
                rounds = 1 + sum(1 for t in job.tasks if t.input.keys_from is not None)
                dest = work_dir(job) / f"{_stem(job)}.{job.id}.retry{rounds}.jsonl"
                source = job.input_path or job.input_file
                count = await asyncio.to_thread(write_subset, source, set(keys), dest)
                failed_input = TaskInput(
                    path=str(dest), start=0, end=None, count=count, keys_from=-1
                )
        result = await self._apply(
            {job_id: self._change(reducers.retry, self.clock(), failed_input)}
        )
        if job_id in result.errors:
            raise result.errors[job_id]
        return Job.from_record(result.records[job_id])

    async def cleanup_remote(self, job_ids: Collection[str] | None = None) -> list[str]:
        """Delete what jobs left remotely (inputs, batches, outputs), finished jobs
        included (each cycle only looks at unfinished ones), and say what failed."""
        jobs = await asyncio.to_thread(self.jobs)
        if job_ids is not None:
            jobs = [job for job in jobs if job.id in job_ids]
        report = CycleReport()
        await self.cleanup_finished(report, jobs, due_only=False)
        return [message for _, message in report.errors]


class _DownloadIncomplete(Exception):
    pass


# -- helpers ---------------------------------------------------------------------------------


def results_path(input_path: Path) -> Path:
    """`<input dir>/results/<input name>` (seed 000)."""
    return input_path.parent / "results" / input_path.name


def _own_results_path(input_path: Path, job_id: str, jobs: list[Job]) -> tuple[str, str]:
    """The results file of a new job, and a note when it is not the usual one: results
    already written (or to be written) for an earlier job of the same input, e.g. one
    submitted again with --force, are never overwritten; the new job gets its own file."""
    usual = results_path(input_path)
    taken = {os.path.realpath(j.result_file) for j in jobs if j.result_file}
    if os.path.realpath(usual) not in taken and not usual.exists():
        return str(usual), ""
    own = usual.with_name(f"{usual.stem}.{job_id}{usual.suffix}")
    owner = next(
        (
            j.id
            for j in jobs
            if j.result_file and os.path.realpath(j.result_file) == os.path.realpath(usual)
        ),
        None,
    )
    whose = f"job {owner}'s results" if owner else "an earlier results file"
    return str(own), f"results will go to {own} ({usual} holds {whose}; it is left as it is)"


def work_dir(job: Job) -> Path:
    return Path(job.result_file or results_path(Path(job.input_file))).parent / WORK_DIR


def part_path(job: Job, task: Any) -> Path:
    """Where a task's verified results wait to be merged. The claim is part of the name:
    a process whose download claim was taken over never touches the file of the one that
    took over (servers on several machines share the data directory)."""
    claim = (task.owner or {}).get("claim") if isinstance(task.owner, dict) else None
    suffix = f".{claim}" if claim else ""
    return work_dir(job) / f"{_stem(job)}.{job.id}.t{task.index}a{task.attempt}{suffix}.jsonl"


def _stem(job: Job) -> str:
    return Path(job.input_file).name.removesuffix(".jsonl")


def cleanup_targets(task: Any, now: float | None = None) -> dict[str, str]:
    """The remote resources a task still owns and may now delete: all of them, or with
    `now`, only those of a finished task whose retry after a failed delete is due."""
    if now is not None and task.state.terminal and task.not_before and task.not_before > now:
        return {}
    return reducers.remote_leftovers(task)


class LeaseLost(InvalidTransition):
    """A write for a claim that no longer holds its task (its lease ran out and another
    process took the task over). Refused, and recorded in the audit log."""

    code = "LEASE_LOST"

    def __init__(self, job_id: str, index: int, claim: Any, holder: Any) -> None:
        now_held = holder.get("claim") if isinstance(holder, dict) else None
        super().__init__("task", "lease lost", "write", None)
        self.args = (
            f"job {job_id} task {index}: claim {claim} lost its lease (now held by "
            f"{now_held or 'nobody'}); the write was refused",
        )


def _fence(job: Job, index: int) -> tuple[int, Any] | None:
    """(index, claim) of the claim `job` (as claimed) holds on the task, if any."""
    owner = job.task(index).owner
    claim = owner.get("claim") if isinstance(owner, dict) else None
    return (index, claim) if claim is not None else None


def _check_fence(job: Job, index: int, claim: Any) -> None:
    owner = job.task(index).owner
    if not isinstance(owner, dict) or owner.get("claim") != claim:
        raise LeaseLost(job.id, index, claim, owner)


def _result_outcomes(job: Job) -> dict[str, bool]:
    """key -> failed in the job's result file ({} when there is none yet)."""
    if not job.result_file or not os.path.isfile(job.result_file):
        return {}
    return key_outcomes(Path(job.result_file))


def _covered(task: Any, outcomes: dict[str, bool]) -> RequestCounts | None:
    """The task's counts when every one of its keys is in `outcomes`, else None. A task
    that retries failed requests is never covered: its keys are in the file as failures."""
    if not outcomes or task.input.keys_from is not None:
        return None
    expected = _expected_keys(task)
    if not expected or not expected <= outcomes.keys():
        return None
    failed = sum(1 for key in expected if outcomes[key])
    return RequestCounts(total=len(expected), succeeded=len(expected) - failed, failed=failed)


def _expected_keys(task: Any) -> set[str]:
    end = task.input.end
    return set(iter_keys(task.input.path, task.input.start, end))


class _InFlight:
    """A job's resource limits in Gemini's units (seed 004): requests and estimated tokens
    in live batches. A task larger than the limit still runs when nothing else is in
    flight, so a job can never wait forever."""

    def __init__(self, job: Job, busy: list[Any]) -> None:
        limits = job.extra.get("resource_limits") or {}
        self.max_requests = limits.get("max_requests_in_flight")
        self.max_tokens = limits.get("max_tokens_in_flight")
        self.requests = sum(t.input.count for t in busy)
        self.tokens = sum(_task_tokens(t) for t in busy)

    def admit(self, task: Any) -> bool:
        requests, tokens = task.input.count, _task_tokens(task)
        nothing_in_flight = self.requests == 0 and self.tokens == 0
        if not nothing_in_flight and (
            (self.max_requests and self.requests + requests > self.max_requests)
            or (self.max_tokens and self.tokens + tokens > self.max_tokens)
        ):
            return False
        self.requests += requests
        self.tokens += tokens
        return True


def _task_tokens(task: Any) -> int:
    """Estimated tokens of a task's input: bytes / 4, as `inputs.estimate_tokens` does."""
    if task.input.end is not None:
        return max(1, (task.input.end - task.input.start) // 4)
    try:
        return max(1, (os.path.getsize(task.input.path) - task.input.start) // 4)
    except OSError:
        return 1


def _unchanged(task: Any, seen: dict[str, Any]) -> bool:
    """batches.get told us nothing new about a task that had no pending error. A terminal
    remote state always goes through the reducer: the task may have learnt it elsewhere
    (a reconcile by display name) without having acted on it."""
    return (
        not RemoteState.parse(seen.get("state")).terminal
        and seen == task.batch
        and task.error is None
        and not task.step_failures
        and task.not_before is None
    )


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
    return count


def _link_single_part(
    present: list[Path], paths: list[Path], result_file: Path, merged_before: bool
) -> bool:
    """One task's verified part becomes the result file as a second name (a hard link:
    no copy of a gigabyte); the part goes once the ledger has recorded the merge. False
    when that is not the case here (several parts, a result file already there, or a
    file system without hard links): merge instead."""
    if merged_before or len(paths) != 1 or len(present) != 1 or result_file.exists():
        return False
    result_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(present[0], result_file)
    except OSError:
        return False
    fsutil.fsync_dir(result_file.parent)
    return True


def _while_unknown(change: Change, index: int, name: str) -> Change:
    """`change`, unless the task's create was settled meanwhile (by another server that
    listed the same batches): then nothing, quietly."""

    def guarded(record: Record) -> Record | None:
        task = Job.from_record(record).task(index)
        if task.state is not TaskState.CREATE_UNKNOWN or task.display_name != name:
            return None
        return change(record)

    return guarded


def _chain(changes: list[Change]) -> Change:
    """Several changes to one record, applied in order within one transaction."""

    def change(record: Record) -> Record | None:
        current: Record | None = record
        for step in changes:
            current = step(current) or current  # type: ignore[arg-type]
        return current

    return change


def _duplicate_of(item: ValidatedInput, jobs: list[Job]) -> Job | None:
    for job in jobs:
        if job.input_path and os.path.realpath(job.input_path) == str(item.path):
            return job
        if job.sha256 and job.sha256 == item.sha256:
            return job
        if not job.input_path and job.input_file:  # the original tool's records: by path
            with contextlib.suppress(OSError):
                if os.path.realpath(job.input_file) == str(item.path):
                    return job
    return None


def _why(job: Job) -> str:
    if job.status is JobStatus.COMPLETED:
        where = f"; results in {job.result_file}" if job.result_file else ""
        return f"already done as job {job.id}{where}"
    if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return (
            f"already submitted as job {job.id}, which {job.status.value}; "
            f"run `gembatch retry {job.id}` or submit with --force"
        )
    return f"already submitted as job {job.id} ({job.status.value})"


def _local_io_advice(
    classified: Classified, exc: BaseException, part: Path, job: Job
) -> Classified:
    """A local write error during a download, said with where and what to do: the bare
    `[Errno 28] No space left on device` names neither the path nor the way out."""
    import errno

    where = getattr(exc, "filename", None) or str(part.parent)
    number = getattr(exc, "errno", None)
    if number in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        what = "no space left on the device" if number == errno.ENOSPC else "over the disk quota"
        if number == errno.EFBIG:
            what = "the file is too large for the file system"
        fix = "free some space there"
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        what, fix = "not allowed to write there", "make it writable"
    else:
        what, fix = getattr(exc, "strerror", None) or classified.message, "fix that"
    message = (
        f"{what} while writing the results to {where}: {fix}; the results are safe on "
        "Gemini and `gembatch poll` downloads them again (or `gembatch retry "
        f"{job.input_file}` once the job has failed)"
    )
    return dataclasses.replace(classified, message=message)


def _headline(classified: Classified) -> str:
    """`429 RESOURCE_EXHAUSTED: You exceeded your quota...`: the code first, for scanning."""
    if classified.code and classified.code not in classified.message:
        return f"{classified.code}: {classified.message}"
    return classified.message


def _report_apply_errors(result: Any, report: CycleReport) -> None:
    for job_id, exc in result.errors.items():
        if isinstance(exc, InvalidTransition):
            report.errors.append((job_id, f"refused: {exc}"))
        else:
            report.errors.append((job_id, f"internal error: {exc!r}"))


__all__ = [
    "AddResult",
    "CycleReport",
    "Decision",
    "Engine",
    "EngineSettings",
    "StartOutcome",
    "now_iso",
    "results_path",
]
