"""The HTTP job service: seed 003's `/api/job/...` and seed 004's `/job-operations`.

Why: web backends want long Gemini batch jobs behind a small API: create, follow by
polling or Server-Sent Events, cancel, delete, clean old ones away. The app wires the
pieces: a SQL ledger (the record, with an event log), the engine (the same as the CLI's)
in a background worker, the SSE hub, the webhook notifier, and per-user isolation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gembatch import __version__
from gembatch.engine import reducers
from gembatch.engine.engine import Engine, EngineSettings
from gembatch.ledger import UnstorableRecord
from gembatch.server import auth, body
from gembatch.server.hub import EventHub, stream_job
from gembatch.server.models import (
    AuditLogModel,
    CleanupResponse,
    CreateJobBody,
    CreateJobResponse,
    DeleteJobData,
    DeleteResponse,
    HealthModel,
    JobListModel,
    JobOperation,
    JobOptions,
    JobStatusModel,
    UpdateBatchJobData,
)
from gembatch.server.request_guard import RequestGuard
from gembatch.server.service import JobService, possible_job_id
from gembatch.server.settings import ServerSettings
from gembatch.server.views import job_status
from gembatch.server.worker import ServiceWorker

_log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"  # the web page served at `/`
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/json-lines")
CREATE_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CreateJobBody"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "options": {
                            "type": "string",
                            "description": "JSON object of job options ("
                            + ", ".join(JobOptions.model_fields)
                            + ")",
                        },
                    },
                }
            },
        },
    }
}
# `/job-operations` reads its body itself too (gembatch.server.body), for the same limits.
OPERATION_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobOperation"}}},
    }
}


def create_app(
    settings: ServerSettings,
    ledger: Any | None = None,
    remote: Any | None = None,
    engine_settings: EngineSettings | None = None,
) -> FastAPI:
    """The FastAPI application; the ledger and the remote are made from `settings` when
    not given (tests pass their own)."""
    from gembatch.ledger.sql import SqlLedger
    from gembatch.server.events import events_for

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if ledger is None:
        ledger = SqlLedger(
            settings.db_url,
            on_change=events_for,
            view=status_of_record,
            data_dir=settings.data_dir,  # records name files relative to it: a site can move
        )
    if remote is None:
        from gembatch.gemini.remote import Remote

        if not settings.api_key:
            from gembatch.gemini.client import require_api_key

            settings.api_key = require_api_key()
        remote = Remote(settings.api_key, settings.base_url, concurrency=settings.poll_concurrency)
    tuned = engine_settings or EngineSettings(
        max_live_batches=settings.max_live_batches, poll_concurrency=settings.poll_concurrency
    )
    engine = Engine(ledger, remote, tuned, role="serve", generation=ledger.restore_generation())
    hub = EventHub(
        ledger, settings.event_poll_interval, requery_interval=settings.event_requery_interval
    )
    if hasattr(ledger, "add_commit_listener"):
        ledger.add_commit_listener(hub.local_commit)  # this process's events leave at once
    holder: dict[str, Any] = {}
    service = JobService(settings, ledger, engine, lambda: holder["worker"].wake())
    worker = ServiceWorker(engine, service, settings.poll_interval)
    holder["worker"] = worker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from gembatch.server.notify import Notifier

        stop = asyncio.Event()
        notifier = Notifier(
            ledger,
            service_url=settings.notify_url,
            max_attempts=settings.notify_attempts,
            base_delay=min(1.0, settings.notify_max_delay),
            max_delay=settings.notify_max_delay,
            allow_private=settings.notify_allow_private,
        )
        tasks = [
            asyncio.create_task(worker.run(stop), name="gembatch-worker"),
            asyncio.create_task(hub.run(stop), name="gembatch-events"),
            asyncio.create_task(notifier.run(stop), name="gembatch-notifier"),
        ]
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=10)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await remote.aclose()

    app = FastAPI(
        title="gembatch",
        version=__version__,
        summary="Gemini Batch API jobs over HTTP, with live progress (SSE)",
        lifespan=lifespan,
    )
    # Cross-site writes and, without tokens, foreign Host names (DNS rebinding): refused
    # before routing. The body types are what the create endpoints read.
    app.add_middleware(
        RequestGuard,
        single_user=settings.single_user,
        body_types=("application/json", "multipart/form-data", *JSONL_TYPES),
    )
    app.state.settings = settings
    app.state.ledger = ledger
    app.state.engine = engine
    app.state.hub = hub
    app.state.service = service
    app.state.worker = worker
    app.state.remote = remote

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(UnstorableRecord)
    async def unstorable(request: Request, exc: UnstorableRecord) -> JSONResponse:
        # The edge (gembatch.server.body) refuses these first; this is the second line.
        problem = body.problem(["body"], f"cannot be stored: {exc}", "unstorable")
        return JSONResponse({"detail": [problem]}, status_code=422)

    # -- create ------------------------------------------------------------------------------
    async def create(request: Request) -> tuple[str, list[str]]:
        user = auth.user_for(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await _create_from_upload(request, user, service, settings)
        if content_type.split(";")[0].strip() in JSONL_TYPES:
            return await _create_from_jsonl_body(request, user, service, settings)
        job_id = reducers.new_job_id()
        document, target = await _read_body(request, settings, job_id, ("requests",))
        return await _create_from_document(service, user, job_id, document, target)

    @app.post(
        "/api/job/batch",
        response_model=CreateJobResponse,
        openapi_extra=CREATE_BODY_DOC,
        responses={400: {}, 401: {}, 413: {}, 422: {}},
    )
    async def create_job(request: Request) -> dict[str, Any]:
        """Create a batch job from a JSONL upload, inline `requests`, or an `input_file` in
        the data directory."""
        job_id, warnings = await create(request)
        return {
            "job_id": job_id,
            "status": "pending",
            "message": f"Batch job created. Poll /api/job/{job_id}/status for progress.",
            "warnings": warnings,
        }

    @app.post("/api/job/batch/stream", openapi_extra=CREATE_BODY_DOC,
              responses={200: {"content": {"text/event-stream": {}}}})  # fmt: skip
    async def create_and_stream(request: Request) -> EventSourceResponse:
        """Create a batch job and stream its events (SSE)."""
        job_id, _ = await create(request)
        # From the job's first event (its `status` at creation), not a snapshot taken
        # when the stream starts: the worker may have moved it on already, and the
        # creator should see every step, as the log has them.
        return _stream(request, job_id, auth.user_for(request), 0)

    # -- read --------------------------------------------------------------------------------
    stored_views = getattr(ledger, "view", None) is not None

    @app.get("/api/job/{job_id}/status", response_model=JobStatusModel, responses={404: {}})
    async def status(job_id: str, request: Request) -> Any:
        """The job's status (seed 003's JobStatus)."""
        user = auth.user_for(request)
        if not stored_views or not possible_job_id(job_id):
            return job_status(await service.job(job_id, user))
        # The hot path of every polling browser: the status JSON the ledger stored with the
        # job's last change, sent as it is (one indexed read; on SQLite without a thread).
        scope = None if settings.single_user else user
        if ledger.reads_inline:
            text = ledger.status_view(job_id, scope)
        else:
            text = await asyncio.to_thread(ledger.status_view, job_id, scope)
        if text is None:
            raise HTTPException(status_code=404, detail=f"Job not found: {job_id}")
        return Response(text.encode(), media_type="application/json")

    @app.get(
        "/api/job/{job_id}/stream",
        responses={200: {"content": {"text/event-stream": {}}}, 204: {}, 404: {}},
    )
    async def stream(job_id: str, request: Request) -> EventSourceResponse:
        """The job's events (SSE): `status` first, then `progress`, then `completed` or
        `error`; `Last-Event-ID` resumes without loss or duplicates. The one endpoint that
        takes the token as `?access_token=` too: EventSource cannot send headers."""
        user = auth.user_for(request, token_in_query=True)
        last = _last_event_id(request)
        job = await service.job(job_id, user)  # 404 before the stream starts
        if last is not None and job.status.terminal:
            newest = await asyncio.to_thread(ledger.last_seq, job_id)
            if newest is not None and last >= newest:
                # The client has the terminal event already: 204 tells EventSource to
                # stop reconnecting (a stream would only send pings for ever).
                return Response(status_code=204)  # type: ignore[return-value]
        return _stream(request, job_id, user, last)

    def _stream(request: Request, job_id: str, user: str, last: int | None) -> Any:
        scope = None if settings.single_user else user
        events = stream_job(hub, job_id, scope, last, settings.ping_interval)
        return EventSourceResponse(
            events,
            ping=3600,  # our own `ping` events carry an id; no comment pings
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/job/{job_id}/results", responses={404: {}})
    async def results(job_id: str, request: Request) -> FileResponse:
        """The job's results file (one line per input key), when it has one."""
        job = await service.job(job_id, auth.user_for(request))
        path = Path(job.result_file) if job.result_file else None
        if path is None or not path.is_file():
            raise HTTPException(
                status_code=404,
                detail=f"no results yet: job {job_id} is {job.status.public}",
            )
        name = Path(job.input_file).name.removesuffix(".jsonl") + ".results.jsonl"
        return FileResponse(path, media_type="application/x-ndjson", filename=name)

    @app.get("/api/jobs", response_model=JobListModel)
    async def list_jobs(
        request: Request,
        status: str | None = Query(None, pattern="^(pending|running|completed|failed|cancelled)$"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10_000_000),
    ) -> dict[str, Any]:
        """The caller's jobs, newest first, optionally by status."""
        from gembatch.jobs import Job

        user = auth.user_for(request)
        scope = None if settings.single_user else user
        records = await asyncio.to_thread(ledger.list_jobs, scope, status, limit, offset)
        if status == "running":  # `cancelling` is shown as running too
            more = await asyncio.to_thread(ledger.list_jobs, scope, "cancelling", limit, offset)
            records = sorted(records + more, key=lambda r: r.get("created_at") or "", reverse=True)[
                :limit
            ]
        jobs = [job_status(Job.from_record(r)) for r in records]
        return {"jobs": jobs, "count": len(jobs)}

    @app.get("/api/job/{job_id}/events", response_model=AuditLogModel, responses={404: {}})
    async def audit_log(job_id: str, request: Request) -> dict[str, Any]:
        """The job's event log and the audit entries about it."""
        await service.job(job_id, auth.user_for(request))
        events = await asyncio.to_thread(ledger.events_after, job_id, 0, 100_000)
        audit = await asyncio.to_thread(ledger.audit_log, job_id)
        return {
            "job_id": job_id,
            "events": [
                {"seq": e.seq, "type": e.type, "data": e.data, "created_at": e.created_at}
                for e in events
            ],
            "audit": audit,
        }

    # -- change ------------------------------------------------------------------------------
    @app.delete("/api/job/{job_id}", response_model=DeleteResponse, responses={400: {}, 404: {}})
    async def delete_job(
        job_id: str, request: Request, force: bool = Query(False)
    ) -> dict[str, Any]:
        """Delete a job. A running job only with `force=true`: its remote batch is cancelled
        and cleaned up first."""
        return await service.delete(auth.user_for(request), job_id, force)

    @app.post("/api/job/cleanup", response_model=CleanupResponse)
    async def cleanup(
        request: Request, max_age_hours: float = Query(24, ge=0, le=24 * 365 * 100)
    ) -> dict[str, Any]:
        """Delete finished jobs older than `max_age_hours`; never unfinished ones."""
        deleted = await service.cleanup(auth.user_for(request), max_age_hours)
        return {"deleted": deleted, "count": len(deleted)}

    @app.post(
        "/job-operations",
        openapi_extra=OPERATION_BODY_DOC,
        responses={400: {}, 404: {}, 409: {}, 422: {}},
    )
    async def job_operations(request: Request) -> dict[str, Any]:
        """Seed 004's operations: `createJob`, `updateBatchJob`, `deleteJob`."""
        user = auth.user_for(request)
        job_id = reducers.new_job_id()
        document, target = await _read_body(request, settings, job_id, ("data", "requests"))
        try:
            if not isinstance(document, dict):
                raise HTTPException(status_code=422, detail=[body.problem(
                    ["body"], 'the body must be an object {"action": ..., "data": {...}}',
                    "dict_type")])  # fmt: skip
            try:
                operation = JobOperation.model_validate(document)
            except ValidationError as exc:
                raise HTTPException(status_code=422, detail=_errors(exc)) from None
            if operation.action == "createJob":
                created, warnings = await _create_from_document(
                    service, user, job_id, operation.data, target, ("body", "data")
                )
                return {
                    "job_id": created,
                    "status": "pending",
                    "message": f"Batch job created. Poll /api/job/{created}/status for progress.",
                    "warnings": warnings,
                }
            target.unlink(missing_ok=True)  # requests given to another action: refused below
            if operation.action == "updateBatchJob":
                data = UpdateBatchJobData.model_validate(operation.data)
                return job_status(await service.update(user, data))
            delete = DeleteJobData.model_validate(operation.data)
            return await service.delete(user, delete.job_id, delete.force)
        except ValidationError as exc:
            target.unlink(missing_ok=True)
            raise HTTPException(status_code=422, detail=_errors(exc, ("body", "data"))) from None
        except Exception:
            target.unlink(missing_ok=True)
            raise

    # -- operations --------------------------------------------------------------------------
    @app.get("/healthz", response_model=HealthModel)
    async def healthz() -> dict[str, Any]:
        try:
            await asyncio.to_thread(ledger.schema_version)
            database = "ok"
        except Exception as exc:
            database = f"error: {type(exc).__name__}"
        return {
            "status": "ok" if database == "ok" and worker.running else "degraded",
            "version": __version__,
            "database": database,
            "worker": worker.health(),
            "events": hub.health(),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: jobs by status, live batches, requests in flight, API calls."""
        from gembatch.server.metrics import render

        stats = remote.stats_snapshot() if hasattr(remote, "stats_snapshot") else None
        text = await asyncio.to_thread(
            render, ledger, remote_stats=stats, live_limit=engine.settings.max_live_batches
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- the web page (static files: no build step) -------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> FileResponse:
        """The job dashboard; it talks to this API like any other client."""
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    _describe_create_body(app)
    return BodyLimit(app, settings.max_upload_bytes)  # type: ignore[return-value]


def status_of_record(record: dict[str, Any]) -> dict[str, Any]:
    """The JobStatus of a stored record (the SQL ledger keeps it with every change)."""
    from gembatch.jobs import Job

    return job_status(Job.from_record(record))


async def _create_from_upload(
    request: Request, user: str, service: JobService, settings: ServerSettings
) -> tuple[str, list[str]]:
    """A multipart upload: field `file` (the JSONL), optional field `options` (JSON)."""
    try:
        form = await request.form(max_files=1, max_fields=20, max_part_size=1024 * 1024)
    except _TooLarge:
        raise
    except Exception as exc:
        raise HTTPException(status_code=400, detail=f"cannot read the upload: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(status_code=422, detail=[{"loc": ["body", "file"],
                            "msg": "a file field named `file` is required",
                            "type": "missing"}])  # fmt: skip
    if "\x00" in (upload.filename or ""):  # it becomes the job's display name
        problem = body.problem(["body", "file"], "the file name holds NUL (\\u0000); rename it")
        raise HTTPException(status_code=422, detail=[problem])
    options = JobOptions()
    raw = form.get("options")
    if isinstance(raw, str) and raw.strip():
        where = ("body", "options")
        try:
            document = body.read_bytes(raw.encode("utf-8", "surrogatepass"), where)
        except body.BodyRefused as exc:
            detail = exc.detail
            if exc.status == 400:  # not JSON: a problem of this field, not of the body
                detail = [body.problem(list(where), detail.replace("the body", "`options`"))]
            raise HTTPException(status_code=422, detail=detail) from None
        if not isinstance(document, dict):
            raise HTTPException(status_code=422, detail=[body.problem(
                list(where), "`options` must be a JSON object", "dict_type")])  # fmt: skip
        try:
            options = JobOptions.model_validate(document)
        except ValidationError as exc:
            raise HTTPException(status_code=422, detail=_errors(exc, where)) from None
    job_id = reducers.new_job_id()
    target = settings.inputs_dir / f"{job_id}.jsonl"
    try:
        with open(target, "wb") as out:
            while chunk := await upload.read(1 << 20):
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    name = Path(upload.filename or f"{job_id}.jsonl").name
    return await service.create_from_upload(user, job_id, target, name, options)


async def _create_from_jsonl_body(
    request: Request, user: str, service: JobService, settings: ServerSettings
) -> tuple[str, list[str]]:
    """The request body IS the JSONL file (`Content-Type: application/jsonl`); options in
    the query string are not supported here: use multipart for options."""
    job_id = reducers.new_job_id()
    target = settings.inputs_dir / f"{job_id}.jsonl"
    with tempfile.NamedTemporaryFile(dir=settings.inputs_dir, delete=False) as out:
        try:
            async for chunk in request.stream():
                out.write(chunk)
        except BaseException:  # over the limit, or the client went away: keep nothing
            out.close()
            Path(out.name).unlink(missing_ok=True)
            raise
    Path(out.name).replace(target)
    return await service.create_from_upload(user, job_id, target, f"{job_id}.jsonl", JobOptions())


async def _read_body(
    request: Request, settings: ServerSettings, job_id: str, requests_at: tuple[str, ...]
) -> tuple[Any, Path]:
    """The JSON body, spooled to disk and read with limits (gembatch.server.body). Inline
    requests found at `requests_at` become the job's input file, `inputs/<job_id>.jsonl`
    (returned; it exists only when there were requests)."""
    target = settings.inputs_dir / f"{job_id}.jsonl"
    spooled, guard = await body.spool(request.stream(), settings.inputs_dir)
    reading = asyncio.ensure_future(
        asyncio.to_thread(
            body.read_spooled, spooled, guard, requests_at=requests_at, requests_file=target
        )
    )
    try:
        document = await asyncio.shield(reading)
    except body.BodyRefused as exc:
        raise HTTPException(status_code=exc.status, detail=exc.detail) from None
    except asyncio.CancelledError:  # the thread goes on: what it writes is removed after
        reading.add_done_callback(lambda _: target.unlink(missing_ok=True))
        raise
    return document, target


# What pydantic checks in place of requests already on disk: the list's length decides
# (none: "at least 1 item"); each request was checked as it was written.
_STAND_IN = {"request": {}}


async def _create_from_document(
    service: JobService,
    user: str,
    job_id: str,
    document: Any,
    target: Path,
    loc: tuple[str, ...] = ("body",),
) -> tuple[str, list[str]]:
    """A create body read by `_read_body` (at `loc` of the request's body): its options
    checked, then the job created. Refused: nothing is left in `inputs/`."""
    try:
        if not isinstance(document, dict):
            raise HTTPException(status_code=422, detail=[body.problem(
                list(loc), "a create body is a JSON object", "dict_type")])  # fmt: skip
        requests = document.get("requests")
        spilled = isinstance(requests, body.Spilled)
        if spilled:
            document = {**document, "requests": [_STAND_IN] * min(1, requests.count)}
        try:
            options = CreateJobBody.model_validate(document)
        except ValidationError as exc:
            raise HTTPException(status_code=422, detail=_errors(exc, loc)) from None
        try:
            return await service.create_from_body(
                user, options, job_id, target if spilled else None
            )
        except HTTPException as exc:
            if loc != ("body",):  # the service names fields of a create body at `body`
                exc.detail = _under_data(exc.detail)
            raise
    except Exception:
        target.unlink(missing_ok=True)
        raise


def _describe_create_body(app: FastAPI) -> None:
    """The create endpoints and `/job-operations` read their body by hand (JSON with
    limits, multipart or raw JSONL), so FastAPI never registers `CreateJobBody` and
    `JobOperation`; add them, and the models they use, to the schema's components so the
    references of `CREATE_BODY_DOC` and `OPERATION_BODY_DOC` resolve for clients and tools."""
    from pydantic.json_schema import models_json_schema

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _, definitions = models_json_schema(
                [(CreateJobBody, "validation"), (JobOperation, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                known.setdefault(name, definition)
            _link_created_job(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# OpenAPI links from a created job to what a client does next with its `job_id`.
CREATED_JOB_LINKS = {
    "GetJobStatus": ("get", "/api/job/{job_id}/status", "The job's status (poll it)."),
    "GetJobEvents": ("get", "/api/job/{job_id}/events", "The job's event and audit log."),
    "GetJobResults": ("get", "/api/job/{job_id}/results", "The job's results, once done."),
    "StreamJob": ("get", "/api/job/{job_id}/stream", "The job's events, live (SSE)."),
    "DeleteJob": ("delete", "/api/job/{job_id}", "Delete (or with force, cancel) the job."),
}


def _link_created_job(schema: dict[str, Any]) -> None:
    """`links` on `POST /api/job/batch`'s 200 response, by the operationIds FastAPI made
    (looked up here, so renaming a handler cannot leave a link dangling)."""
    paths = schema.get("paths", {})
    response = paths["/api/job/batch"]["post"]["responses"]["200"]
    links = response.setdefault("links", {})
    for name, (method, path, description) in CREATED_JOB_LINKS.items():
        links[name] = {
            "operationId": paths[path][method]["operationId"],
            "parameters": {"job_id": "$response.body#/job_id"},
            "description": description,
        }


# Event numbers are a job's own sequence (a PostgreSQL INTEGER). A larger Last-Event-ID was
# never sent by this service: 400, rather than "after the end", which on a running job
# would be a stream that waits for ever for events it will never have.
MAX_EVENT_ID = 2**31 - 1


def _last_event_id(request: Request) -> int | None:
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if value is None or value == "":
        return None
    value = value.strip()
    if value.startswith("-") and value[1:].isdecimal():
        raise HTTPException(status_code=400, detail="Last-Event-ID must not be negative")
    if not (value.isascii() and value.isdecimal()):
        raise HTTPException(status_code=400, detail="Last-Event-ID must be a number")
    if len(value) > 10 or int(value) > MAX_EVENT_ID:
        raise HTTPException(
            status_code=400,
            detail=f"Last-Event-ID {value[:20]} is not an event of this service (they are "
            f"numbered from 1 to at most {MAX_EVENT_ID}): reconnect without it",
        )
    return int(value)


def _under_data(detail: Any) -> Any:
    """FastAPI-style problems about a create body, as locations in `/job-operations`'s
    body: `["body", "requests", 3]` becomes `["body", "data", "requests", 3]`. Other
    details (a message, `["input", ...]` locations) are left as they are."""
    if not isinstance(detail, list):
        return detail
    moved = []
    for item in detail:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list) and loc[:1] == ["body"]:
            item = {**item, "loc": ["body", "data", *loc[1:]]}
        moved.append(item)
    return moved


def _errors(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> list[dict[str, Any]]:
    return [
        {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


class _TooLarge(HTTPException):
    """Raised while a body streams in; FastAPI answers it as a 413."""

    def __init__(self, seen: int, limit: int) -> None:
        super().__init__(status_code=413, detail=_too_large(seen, limit))


class BodyLimit:
    """413 for request bodies over the limit: checked on Content-Length, and counted while
    a body without one streams in (nothing over the limit is read into memory or disk)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __getattr__(self, name: str) -> Any:  # `app.state`, `app.openapi()`, ...
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_413(send, int(declared), self.limit)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen, self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, seen, self.limit)


def _too_large(size: int, limit: int) -> str:
    return (
        f"the request body is over the upload limit of {limit} bytes ({size} bytes or "
        "more); split the input or raise --max-upload-mb"
    )


async def _send_413(send: Send, size: int, limit: int) -> None:
    body = json.dumps({"detail": _too_large(size, limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
