"""Job operations as the HTTP API offers them: create, delete, update, cleanup.

Why: the REST endpoints (seed 003) and `/job-operations` (seed 004) are two spellings of
the same operations, and both must follow the same rules: inputs only from the request or
the data directory, a running job deleted only with `force` (which cancels the remote
batch first), user-requested transitions limited to cancel and retry, everything refused
audited. They all end in the engine; this module only checks and translates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from gembatch.engine.engine import Engine
from gembatch.inputs import InputInvalid, SplitLimits, validate_file
from gembatch.jobs import InvalidTransition, Job, JobStatus, RetryConfig
from gembatch.server.models import (
    MAX_TASKS_PER_JOB,
    CreateJobBody,
    JobOptions,
    UpdateBatchJobData,
)
from gembatch.server.settings import ServerSettings
from gembatch.server.webhook_targets import target_problem

DELETE_RUNNING = (
    "Cannot delete a running job. Wait for completion or failure, or delete with "
    "?force=true to cancel its remote batch first."
)
TASK_BYTES_TOO_SMALL = (
    "max_task_bytes is smaller than a line of the input: every request must fit in one task; "
    "raise max_task_bytes or leave it out"
)
INTERNAL_DIRS = ("inputs", "results")  # the service's own, under the data directory
INPUT_FILE_RULE = (
    "input_file must be a path relative to the service's data directory, to a file the "
    "operator put there; not under inputs/ or results/ (the service's copies of uploads "
    "and results), not a hidden file, not the database, a backup of it or the tokens file"
)
# How database files begin: SQLite's (the database, and every `gembatch db backup` copy,
# whatever its name) and `pg_dump -Fc`'s. Other users' jobs are in there.
DATABASE_MAGIC = (b"SQLite format 3\x00", b"PGDMP")
RESOURCE_NOTE = (
    "resource_limits.max_memory and max_cpu have no meaning for work done on Google's "
    "side and are ignored; use max_requests_in_flight or max_tokens_in_flight"
)


# Any job id this service made or will make (`j` + 16 hex digits), and more. Anything else
# (NUL, spaces, control characters) is not found without asking the database, which may
# not even be able to hold it: PostgreSQL text has no NUL.
_POSSIBLE_JOB_ID = re.compile(r"[\x21-\x7e]{1,128}")


def possible_job_id(job_id: str) -> bool:
    """Whether `job_id` (from a path or a body) can name a job at all."""
    return _POSSIBLE_JOB_ID.fullmatch(job_id) is not None


def not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"Job not found: {job_id[:128]}")


class JobService:
    def __init__(self, settings: ServerSettings, ledger: Any, engine: Engine, wake: Any) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engine = engine
        self.wake = wake  # callable: run the worker now
        self.results_dir = settings.data_dir / "results"
        settings.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # Forced deletes waiting for the remote cancel. Kept in the records too, so a
        # restarted service finds them again (`find_pending_deletes`).
        self._pending_deletes: set[str] = set()
        self._scanned = False
        # Models the API said it serves, checked once per process (not once per job);
        # a lock per model so a burst of creates with a new model makes one call.
        self._known_models: set[str] = set()
        self._model_locks: dict[str, asyncio.Lock] = {}

    # -- reading -----------------------------------------------------------------------------
    async def job(self, job_id: str, user: str) -> Job:
        if not possible_job_id(job_id):
            raise not_found(job_id)
        record = await asyncio.to_thread(self.ledger.get, job_id, self._scope(user))
        if record is None:
            raise not_found(job_id)
        return Job.from_record(record)

    def _scope(self, user: str) -> str | None:
        """Every job belongs to its user; in single-user mode that is everyone's."""
        return None if self.settings.single_user else user

    # -- create ------------------------------------------------------------------------------
    async def create_from_body(
        self, user: str, body: CreateJobBody, job_id: str, requests_file: Path | None
    ) -> tuple[str, list[str]]:
        """A create body already read (gembatch.server.body): its inline requests are in
        `requests_file` (one JSONL line each), or it names an `input_file`."""
        target = self.settings.inputs_dir / f"{job_id}.jsonl"
        if body.requests is not None:
            assert requests_file is not None and requests_file == target
            label = f"inline-{job_id}.jsonl"
        else:
            source = self._inside_data_dir(body.input_file or "")
            await asyncio.to_thread(_copy_input, source, target)
            label = Path(body.input_file or "").name
        metadata = dict(body.metadata)
        for name in ("product_id", "sending_group_id"):
            value = getattr(body, name)
            if value is not None:
                metadata[name] = value
        options = body.model_copy(update={"metadata": metadata})
        return await self._create(user, job_id, target, label, options, inline=body.requests)

    async def create_from_upload(
        self, user: str, job_id: str, target: Path, filename: str, options: JobOptions
    ) -> tuple[str, list[str]]:
        return await self._create(user, job_id, target, filename or f"{job_id}.jsonl", options)

    async def _create(
        self,
        user: str,
        job_id: str,
        target: Path,
        label: str,
        options: JobOptions,
        inline: Any = None,
    ) -> tuple[str, list[str]]:
        split = SplitLimits(
            max_bytes=options.max_task_bytes or SplitLimits().max_bytes,
            max_requests=options.max_task_requests,
        )
        try:
            validated = await asyncio.to_thread(validate_file, target, split)
        except InputInvalid as exc:
            target.unlink(missing_ok=True)
            detail = _problems(exc, inline is not None)
            if options.max_task_bytes and any("task size limit" in p["msg"] for p in detail):
                detail.append(_split_problem("max_task_bytes", TASK_BYTES_TOO_SMALL))
            raise HTTPException(status_code=422, detail=detail) from None
        if len(validated.tasks) > MAX_TASKS_PER_JOB:
            target.unlink(missing_ok=True)
            field = "max_task_requests" if options.max_task_requests else "max_task_bytes"
            message = (
                f"the input would be split into {len(validated.tasks)} tasks (remote batches); "
                f"at most {MAX_TASKS_PER_JOB} per job: raise max_task_requests or max_task_bytes"
            )
            raise HTTPException(status_code=422, detail=[_split_problem(field, message)])
        if options.notify_url:
            problem = await target_problem(
                options.notify_url, allow_private=self.settings.notify_allow_private
            )
            if problem is not None:
                target.unlink(missing_ok=True)
                raise HTTPException(
                    status_code=422,
                    detail=[{"loc": ["body", "notify_url"], "msg": f"notify_url {problem}",
                             "type": "notify_url_refused"}],
                )  # fmt: skip
        model = options.model or self.settings.model
        try:
            await self._check_model(model, from_request=options.model is not None)
        except HTTPException:
            target.unlink(missing_ok=True)
            raise
        validated = dataclasses.replace(validated, display=label)
        warnings = []
        limits = options.resource_limits
        if limits is not None and (limits.max_memory is not None or limits.max_cpu is not None):
            warnings.append(RESOURCE_NOTE)
        retry = RetryConfig()
        if options.retry_config is not None:
            retry = RetryConfig.from_dict(options.retry_config.model_dump(mode="json"))
        extra = {
            "user_id": user,
            "job_type": "batch",
            "display_name": options.display_name or label,
            "metadata": options.metadata,
            "notify_url": options.notify_url,
            "resource_limits": limits.model_dump() if limits else None,
        }
        try:
            await asyncio.to_thread(
                self.engine.add_jobs,
                [validated],
                model=model,
                priority=options.priority,
                retry_config=retry,
                max_parallel_tasks=options.max_parallel_tasks,
                force=True,
                job_ids=[job_id],
                extra=extra,
                result_files=[str(self.results_dir / f"{job_id}.jsonl")],
            )
        except Exception:  # refused by the ledger (a value it cannot store)
            target.unlink(missing_ok=True)
            raise
        self.wake()
        return job_id, warnings

    async def _check_model(self, model: str, from_request: bool) -> None:
        """422 for a model the API does not serve (404 from models.get), before the job
        is stored. When the check cannot tell (network, 5xx, 429 after one retry; a bad
        key), the job is accepted and the create decides: see
        gembatch.gemini.model_check.check_model."""
        from gembatch.gemini.model_check import check_model

        if model in self._known_models:
            return
        async with self._model_locks.setdefault(model, asyncio.Lock()):
            if model in self._known_models:
                return
            check = await check_model(self.engine.remote, model)
            if check.known:
                self._known_models.add(model)
                return
        self._model_locks.pop(model, None)  # names from clients: keep only the known ones
        if check.known is None:
            return
        fix = (
            "give a model the API serves in `model`"
            if from_request
            else f"the service's default model {model!r} is not served: restart it with "
            "another --model (or $GEMBATCH_MODEL), or give `model` in the request"
        )
        message = f"{check.refusal}; {fix}"
        raise HTTPException(
            status_code=422,
            detail=[{"loc": ["body", "model"], "msg": message, "type": "unknown_model"}],
        )

    def _inside_data_dir(self, relative: str) -> Path:
        """A path given by a client, allowed only inside the data directory (after
        resolving `..` and symlinks) and outside the service's own files there: its
        copies of every user's uploads (`inputs/`), their results (`results/`), hidden
        files, and the database or tokens file when they live there. Absolute paths are
        refused."""
        root = self.settings.data_dir.resolve()
        if not relative or os.path.isabs(relative) or relative.startswith("~"):
            raise HTTPException(status_code=400, detail=INPUT_FILE_RULE)
        try:
            candidate = (root / relative).resolve()
            inside = candidate == root or root in candidate.parents
            internal = inside and self._internal(root, candidate)
            found = inside and not internal and candidate.is_file()
        # A name too long, a NUL byte; a symlink loop (RuntimeError before Python 3.13).
        except (OSError, ValueError, RuntimeError) as exc:
            # The reason alone: an OSError's text names the path as the server sees it.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise HTTPException(
                status_code=400, detail=f"input_file {relative[:200]!r} is not usable: {reason}"
            ) from None
        if not inside:
            raise HTTPException(
                status_code=400,
                detail="input_file must stay inside the service's data directory. "
                + INPUT_FILE_RULE,
            )
        if internal:
            raise HTTPException(
                status_code=400,
                detail=f"input_file {relative[:200]!r} is one of the service's own files. "
                + INPUT_FILE_RULE,
            )
        if not found:
            raise HTTPException(
                status_code=400,
                detail=f"input_file {relative[:200]!r}: no such file in the data directory",
            )
        return candidate

    def _internal(self, root: Path, candidate: Path) -> bool:
        """True for the service's own files under the data directory (resolved paths)."""
        parts = candidate.relative_to(root).parts
        if not parts or parts[0] in INTERNAL_DIRS or any(p.startswith(".") for p in parts):
            return True
        own = [self.settings.tokens_file, _sqlite_path(self.settings.db_url)]
        for path in filter(None, own):
            resolved = path.resolve()
            # The database's companions too: -wal, -shm, -journal, .server.lock, backups.
            if candidate.parent == resolved.parent and candidate.name.startswith(resolved.name):
                return True
        return _is_database_file(candidate)

    # -- delete ------------------------------------------------------------------------------
    async def delete(self, user: str, job_id: str, force: bool) -> dict[str, Any]:
        job = await self.job(job_id, user)
        if job.status in (JobStatus.RUNNING, JobStatus.CANCELLING):
            if not force:
                await self._audit(user, "delete_refused", job_id, {"status": job.status.value})
                raise HTTPException(status_code=400, detail=DELETE_RUNNING)
            await self._cancel(job_id)
            await self._mark_for_deletion(job_id, user)
            await self._audit(user, "force_delete", job_id, {"status": job.status.value})
            self.wake()
            return {
                "job_id": job_id,
                "status": "cancelling",
                "message": "cancelling the remote batch; the job is deleted when Gemini "
                "confirms and its files are cleaned up",
            }
        if job.status is JobStatus.PENDING:
            job = await self._cancel(job_id)
        await self.remove(job, actor=f"api:{user}", reason="deleted by the user")
        return {"job_id": job_id, "status": "deleted", "message": "job deleted"}

    async def remove(self, job: Job, *, actor: str, reason: str) -> None:
        """Delete a finished job: what it left remotely, its local files, its records."""
        for task in job.tasks:
            for name in (task.uploaded_file_name,):
                if name and not task.cleaned.get("input_file"):
                    with contextlib.suppress(Exception):
                        await self.engine.remote.delete_file(name)
        await asyncio.to_thread(self._remove_files, job)
        await asyncio.to_thread(self.ledger.delete_job, job.id, actor=actor, reason=reason)

    def _remove_files(self, job: Job) -> None:
        for path in (job.input_path, job.result_file):
            if path:
                Path(path).unlink(missing_ok=True)
        for task in job.tasks:
            if task.part_file:
                Path(task.part_file).unlink(missing_ok=True)
            if task.input.keys_from is not None:
                Path(task.input.path).unlink(missing_ok=True)

    async def _cancel(self, job_id: str) -> Job:
        try:
            return await self.engine.cancel(job_id)
        except InvalidTransition:
            return Job.from_record(await asyncio.to_thread(self.ledger.get, job_id))

    async def _mark_for_deletion(self, job_id: str, user: str) -> None:
        def mark(record: dict[str, Any]) -> dict[str, Any]:
            return {**record, "delete_after_cancel": {"by": user}}

        await asyncio.to_thread(self.ledger.apply, {job_id: mark})
        self._pending_deletes.add(job_id)

    async def delete_cancelled(self) -> list[str]:
        """Jobs whose forced delete waited for the remote cancel: remove the finished ones."""
        if not self._scanned:  # once per process: forced deletes a previous run left
            self._scanned = True
            for record in (await asyncio.to_thread(self.ledger.load_active)).records:
                if record.get("delete_after_cancel"):
                    self._pending_deletes.add(record["id"])
            for status in ("completed", "failed", "cancelled"):
                for record in await asyncio.to_thread(
                    self.ledger.list_jobs, None, status, 100_000, 0
                ):
                    if record.get("delete_after_cancel"):
                        self._pending_deletes.add(record["id"])
        done = []
        for job_id in sorted(self._pending_deletes):
            record = await asyncio.to_thread(self.ledger.get, job_id)
            if record is None:
                self._pending_deletes.discard(job_id)
                continue
            if record.get("status") in ("completed", "failed", "cancelled"):
                job = Job.from_record(record)
                by = (record.get("delete_after_cancel") or {}).get("by", "?")
                await self.remove(job, actor=f"api:{by}", reason="forced delete")
                self._pending_deletes.discard(job_id)
                done.append(job.id)
        return done

    # -- update ------------------------------------------------------------------------------
    async def update(self, user: str, data: UpdateBatchJobData) -> Job:
        job = await self.job(data.job_id, user)
        for field in ("detailed_status", "error_details"):
            if getattr(data, field) is not None:
                raise HTTPException(
                    status_code=400,
                    detail=f"{field} is computed by gembatch from the job's progress and "
                    "errors; it cannot be set",
                )
        if data.priority is not None and data.priority != job.priority:

            def set_priority(record: dict[str, Any]) -> dict[str, Any]:
                return {**record, "priority": data.priority}

            await asyncio.to_thread(self.ledger.apply, {job.id: set_priority})
            await self._audit(user, "priority", job.id, {"from": job.priority, "to": data.priority})
            self.wake()
        if data.status is not None and data.status != job.status.public:
            await self._transition(user, job, data.status)
        return await self.job(job.id, user)

    async def _transition(self, user: str, job: Job, target: str) -> None:
        """The transitions open to users: cancel a pending or running job; retry a finished
        one. Every other request is refused with 409 and audited."""
        try:
            if target == "cancelled" and job.status in (JobStatus.PENDING, JobStatus.RUNNING):
                await self.engine.cancel(job.id)
                await self._audit(user, "cancel", job.id, {"from": job.status.value})
            elif target == "pending" and job.status.terminal:
                await self.engine.retry(job.id)
                await self._audit(user, "retry", job.id, {"from": job.status.value})
            else:
                raise InvalidTransition("job", job.status.public, f"set status to {target}")
        except InvalidTransition as exc:
            await self._audit(
                user, "transition_refused", job.id,
                {"from": job.status.public, "to": target, "reason": str(exc)},
            )  # fmt: skip
            raise HTTPException(
                status_code=409,
                detail={
                    "code": "INVALID_TRANSITION",
                    "message": f"job {job.id} cannot go from {job.status.public} to {target}: "
                    f"{exc}",
                    "from": job.status.public,
                    "to": target,
                },
            ) from None
        self.wake()

    async def _audit(self, user: str, action: str, job_id: str, detail: dict[str, Any]) -> None:
        await asyncio.to_thread(self.ledger.audit, f"api:{user}", action, job_id, detail)

    # -- cleanup -----------------------------------------------------------------------------
    async def cleanup(self, user: str, max_age_hours: float) -> list[str]:
        """Delete the caller's finished jobs older than `max_age_hours`; never unfinished."""
        import time

        from gembatch.jobs import parse_time

        cutoff = time.time() - max_age_hours * 3600
        deleted = []
        offset = 0
        while True:
            page = await asyncio.to_thread(
                self.ledger.list_jobs, self._scope(user), None, 500, offset
            )
            if not page:
                break
            offset += len(page)
            for record in page:
                job = Job.from_record(record)
                finished = parse_time(job.completed_at)
                if job.status.terminal and finished is not None and finished < cutoff:
                    await self.remove(job, actor=f"api:{user}", reason="cleanup")
                    deleted.append(job.id)
                    offset -= 1
        return deleted


def _is_database_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:  # a directory, or unreadable: the caller says so
        return False
    return head.startswith(DATABASE_MAGIC)


def _sqlite_path(db_url: str) -> Path | None:
    prefix = "sqlite:///"
    if not db_url.startswith(prefix) or db_url == prefix:
        return None
    path = db_url.removeprefix(prefix).split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _copy_input(source: Path, target: Path) -> None:
    """The job keeps its own copy of the input: later edits of the original (even in
    place, which a hard link would share) must not change what the job submits."""
    try:
        shutil.copyfile(source, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _split_problem(field: str, message: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": message, "type": "value_error"}


def _problems(exc: InputInvalid, inline: bool) -> list[dict[str, Any]]:
    """Validation problems in FastAPI's detail format (`loc`, `msg`, `type`)."""
    items = []
    for problem in exc.problems:
        if inline and problem.line is not None:
            loc: list[Any] = ["body", "requests", problem.line - 1]
        elif problem.line is not None:
            loc = ["input", "line", problem.line]
        else:
            loc = ["input"]
        items.append({"loc": loc, "msg": problem.message, "type": "invalid_request"})
    if exc.omitted:
        items.append({"loc": ["input"], "msg": f"... and {exc.omitted} more problems",
                      "type": "invalid_request"})  # fmt: skip
    return items
