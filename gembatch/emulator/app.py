"""The emulator's HTTP surface: Files, Batches and Models under v1, v1beta and v1alpha.

Why: the unmodified google-genai SDK must not notice it is talking to a local server, so
every route, header and status code follows reference/gemini-wire.md (absolute resumable
upload URLs, `X-Goog-Upload-Status` on every chunk answer, 200 for every success, Google's
error envelope, `operations`/`files` list keys, no empty page carrying a token). A small
`/_emulator/` API beside it lets tests count what clients did and change faults live.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gembatch import __version__
from gembatch.emulator.batches import TERMINAL, BatchEngine, Settings
from gembatch.emulator.config import ConfigError, EmulatorConfig
from gembatch.emulator.faults import FaultInjector, Truncation
from gembatch.emulator.models import is_known, model_not_found, model_resource, supports_batch
from gembatch.emulator.responders import Responder, make_responder
from gembatch.emulator.store import BatchRow, FileRow, Store, UploadRow
from gembatch.emulator.wire import (
    ApiError,
    file_permission_denied,
    get_field,
    int64,
    invalid_argument,
    new_id,
    not_found,
    timestamp,
)

_API_PATH = re.compile(
    r"^(?P<prefix>(?:/[^/]+)*?)/(?:(?P<kind>upload|download)/)?(?P<version>v1|v1beta|v1alpha)/"
    r"(?P<rest>.*)$"
)
_FILE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_ROUTES: list[tuple[str, str | None, re.Pattern[str], str]] = [
    ("POST", "upload", re.compile(r"^files$"), "files.upload"),
    ("GET", None, re.compile(r"^files$"), "files.list"),
    ("GET", None, re.compile(r"^files/(?P<id>[^/:]+):download$"), "files.download"),
    ("GET", "download", re.compile(r"^files/(?P<id>[^/:]+):download$"), "files.download"),
    ("GET", None, re.compile(r"^files/(?P<id>[^/:]+)$"), "files.get"),
    ("DELETE", None, re.compile(r"^files/(?P<id>[^/:]+)$"), "files.delete"),
    (
        "POST",
        None,
        re.compile(r"^(?P<model>(?:models|tunedModels)/[^/:]+):batchGenerateContent$"),
        "batches.create",
    ),
    ("GET", None, re.compile(r"^batches$"), "batches.list"),
    ("GET", None, re.compile(r"^batches/(?P<id>[^/:]+)$"), "batches.get"),
    ("POST", None, re.compile(r"^batches/(?P<id>[^/:]+):cancel$"), "batches.cancel"),
    ("DELETE", None, re.compile(r"^batches/(?P<id>[^/:]+)$"), "batches.delete"),
    ("GET", None, re.compile(r"^models$"), "models.list"),
    ("GET", None, re.compile(r"^(?P<model>(?:models|tunedModels)/[^/:]+)$"), "models.get"),
]
_Row = TypeVar("_Row", FileRow, BatchRow)
# An endpoint's method: (request, version, prefix, **path parameters) -> response.
_Handler = Callable[..., Awaitable[Response]]
# Starlette's Route for GET also answers HEAD; other methods get its 405.
_ROUTED_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "PUT", "PATCH"})
_UNREGISTERED = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)


class Emulator:
    """One emulator instance: state directory, live configuration, batch engine."""

    def __init__(self, state_dir: Path, config: EmulatorConfig) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.config = config
        self.faults = FaultInjector(config.faults, config.seed)
        self.responder: Responder = make_responder(config.responder, config.seed)
        self.settings = self._settings_for(config)
        self._detached: set[asyncio.Future[Response]] = set()  # work that outlives its call
        self.engine = BatchEngine(
            self.store, lambda: self.settings, lambda: self.responder, lambda: self.faults
        )
        self.app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._dispatch,
                    methods=["GET", "POST", "DELETE", "PUT", "PATCH"],
                )
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _ROUTED_METHODS:
            await self.app(scope, receive, send)  # lifespan; Starlette's 405 for the rest
            return
        # The app's one route, called directly: Starlette's router and middleware would
        # add their cost to every call of a poll storm, for nothing this app uses. Like
        # Starlette's ServerErrorMiddleware, an unexpected error answers a plain 500 and
        # is raised on for the server to log.
        request = Request(scope, receive, send)
        try:
            response = await self._dispatch(request)
        except Exception:
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        await response(scope, receive, send)

    @staticmethod
    def _settings_for(config: EmulatorConfig) -> Settings:
        return Settings(
            pending_s=config.clock.pending_seconds,
            running_s=config.clock.running_seconds,
            expire_s=config.clock.expire_after_seconds,
            file_ttl_s=config.clock.file_ttl_seconds,
            shuffle=config.quirks.shuffle_output,
            seed=config.seed,
            max_active=config.limits.max_active_batches,
            max_enqueued_tokens=config.limits.max_enqueued_tokens,
            max_inline_bytes=config.limits.max_inline_bytes,
            actual_progress=config.responder.kind != "local",
            concurrency=config.responder.concurrency if config.responder.kind != "local" else 1,
        )

    def apply_config(self, config: EmulatorConfig) -> None:
        """Switch to a new configuration; batches already created keep their clock."""
        self.faults = FaultInjector(config.faults, config.seed)
        if config.responder != self.config.responder or config.seed != self.config.seed:
            self.responder = make_responder(config.responder, config.seed)
        self.settings = self._settings_for(config)
        self.config = config

    def close(self) -> None:
        self.engine.close()
        self.responder.close()
        self.store.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sweep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await anyio.to_thread.run_sync(self.close)

    async def _sweep(self) -> None:
        """Start output generation for running batches, publish finished ones, and write
        the call counters kept in memory (so a SIGKILL loses at most ~0.2 s of them)."""
        rounds = 0
        while True:
            try:
                # On the event loop: a tick visits only the batches whose clock moved,
                # cheaper than the hop to a worker thread.
                self.engine.tick()
                rounds += 1
                if rounds % 2 == 0:
                    self.store.flush_counts()
            except Exception:
                traceback.print_exc()
            await asyncio.sleep(0.1)

    # -- dispatch ----------------------------------------------------------------------
    async def _dispatch(self, request: Request) -> Response:
        path = request.scope["path"]
        if any(c in path for c in "?#\\"):
            path = request.url.path  # escaped the way Starlette's URL does
        if "//" in path:
            path = re.sub(r"/{2,}", "/", path)
        if path.startswith("/_emulator/") or path == "/_emulator":
            return await self._introspection(request, path)
        match = _API_PATH.match(path)
        endpoint, params = None, {}
        if match:
            for method, kind, pattern, name in _ROUTES:
                if method != request.method or kind != match["kind"]:
                    continue
                found = pattern.match(match["rest"])
                if found:
                    endpoint, params = name, found.groupdict()
                    break
        if endpoint is None or match is None:
            return _error_response(
                ApiError(404, f"Method not found: {request.method} {path}", "NOT_FOUND")
            )
        is_chunk = endpoint == "files.upload" and "upload_id" in request.query_params
        if is_chunk:
            endpoint = "files.upload_chunk"
        self.store.count(f"calls:{endpoint}")
        try:
            if not is_chunk:
                self._authorize(request)
            decision = self.faults.decide(endpoint)
            handler: _Handler = getattr(self, "_" + endpoint.replace(".", "_"))

            async def call() -> Response:
                if decision.latency_seconds:
                    await asyncio.sleep(decision.latency_seconds)
                if decision.error is not None:
                    self.store.count(f"faults:{endpoint}")
                    raise decision.error
                response = await handler(request, match["version"], match["prefix"], **params)
                if decision.latency_after_seconds:
                    await asyncio.sleep(decision.latency_after_seconds)
                return response

            if not decision.detached:
                return await call()
            # Shielded: a disconnect cancels this handler, not the work (which has the
            # request body read, and kept, before the client can go).
            await request.body()
            work = asyncio.ensure_future(call())
            self._detached.add(work)
            work.add_done_callback(self._detached.discard)
            return await asyncio.shield(work)
        except ApiError as error:
            response = _error_response(error)
            if is_chunk:  # the SDK re-sends a chunk whose answer lacks this header
                response.headers["X-Goog-Upload-Status"] = "final"
            return response
        except Exception as exc:
            traceback.print_exc()
            response = _error_response(ApiError(500, f"Internal emulator error: {exc}"))
            if is_chunk:
                response.headers["X-Goog-Upload-Status"] = "final"
            return response

    def _authorize(self, request: Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key") or ""
        key = key.strip()
        if not key:
            raise ApiError(403, _UNREGISTERED, "PERMISSION_DENIED")
        allowed = self.config.auth.api_keys
        if allowed and key not in allowed:
            raise ApiError(
                400,
                "API key not valid. Please pass a valid API key.",
                "INVALID_ARGUMENT",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )

    # -- files -------------------------------------------------------------------------
    async def _files_upload(self, request: Request, version: str, prefix: str) -> Response:
        if request.headers.get("x-goog-upload-protocol", "").lower() != "resumable" or (
            request.headers.get("x-goog-upload-command", "").lower() != "start"
        ):
            raise invalid_argument(
                "Only resumable uploads are supported: send X-Goog-Upload-Protocol: resumable "
                "and X-Goog-Upload-Command: start."
            )
        body = await _json_body(request, allow_empty=True)
        meta = get_field(body, "file") or {}
        if not isinstance(meta, dict):
            raise invalid_argument("`file` must be an object.", "file")
        size_text = request.headers.get("x-goog-upload-header-content-length")
        if size_text is None:
            size_text = get_field(meta, "sizeBytes")
        try:
            total = int(size_text)
        except (TypeError, ValueError):
            raise invalid_argument(
                "X-Goog-Upload-Header-Content-Length must give the file size in bytes."
            ) from None
        limit = self.config.limits.max_file_bytes
        if total < 0 or total > limit:
            raise invalid_argument(
                f"File size {total} bytes exceeds the maximum allowed size of {limit} bytes.",
                "file.size_bytes",
            )
        display_name = get_field(meta, "displayName")
        if display_name is not None and (
            not isinstance(display_name, str) or len(display_name) > 512
        ):
            raise invalid_argument(
                "file.display_name must be a string of at most 512 characters.",
                "file.display_name",
            )
        file_id = None
        name = get_field(meta, "name")
        if name is not None:
            file_id = str(name).removeprefix("files/")
            if not _FILE_ID.match(file_id):
                raise invalid_argument(
                    f"Invalid file name {name!r}: up to 40 lowercase letters, digits or dashes, "
                    "not starting or ending with a dash.",
                    "file.name",
                )
            if self.store.get_file(file_id, time.time()) is not None:
                raise ApiError(409, f"File files/{file_id} already exists.", "ALREADY_EXISTS")
        mime_type = request.headers.get("x-goog-upload-header-content-type") or get_field(
            meta, "mimeType"
        )
        upload_id = new_id(40)
        self.store.upload_path(upload_id).write_bytes(b"")
        self.store.insert_upload(
            UploadRow(upload_id, file_id, display_name, mime_type, total, 0, time.time())
        )
        self.store.incr("upload_starts")
        base = _base_url(request, prefix)
        return Response(
            status_code=200,
            headers={
                "X-Goog-Upload-URL": (
                    f"{base}/upload/{version}/files?upload_id={upload_id}&upload_protocol=resumable"
                ),
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": "8388608",
            },
        )

    async def _files_upload_chunk(self, request: Request, version: str, prefix: str) -> Response:
        upload_id = request.query_params["upload_id"]
        upload = self.store.get_upload(upload_id)
        if upload is None:
            raise not_found(f"Upload {upload_id} was not found or has already finished.")
        command = {
            c.strip().lower() for c in request.headers.get("x-goog-upload-command", "").split(",")
        }
        if "query" in command:
            return Response(
                status_code=200,
                headers={
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Size-Received": str(upload.received),
                },
            )
        if "cancel" in command:
            self.store.delete_upload(upload_id)
            return Response(status_code=200, headers={"X-Goog-Upload-Status": "cancelled"})
        if "upload" not in command and "finalize" not in command:
            raise invalid_argument("X-Goog-Upload-Command must be upload, finalize or query.")
        try:
            offset = int(request.headers.get("x-goog-upload-offset", ""))
        except ValueError:
            raise invalid_argument("X-Goog-Upload-Offset is required.") from None
        if offset != upload.received:
            raise invalid_argument(
                f"X-Goog-Upload-Offset {offset} does not match the {upload.received} bytes "
                "received so far."
            )
        part = self.store.upload_path(upload_id)
        received = upload.received
        chunks: list[bytes] = []
        async for chunk in request.stream():
            chunks.append(chunk)
            received += len(chunk)
            if received > upload.total_bytes:
                raise invalid_argument(
                    f"Upload has more bytes than the {upload.total_bytes} announced at start."
                )
        data = b"".join(chunks)
        await anyio.to_thread.run_sync(_write_at, part, offset, data)
        self.store.set_upload_received(upload_id, received)
        if "finalize" not in command:
            return Response(status_code=200, headers={"X-Goog-Upload-Status": "active"})
        if received != upload.total_bytes:
            raise invalid_argument(
                f"Upload finalized with {received} of the {upload.total_bytes} bytes announced."
            )
        row = await anyio.to_thread.run_sync(self._finish_upload, upload)
        return JSONResponse(
            {"file": self._file_json(row, request, version, prefix)},
            headers={"X-Goog-Upload-Status": "final"},
        )

    def _finish_upload(self, upload: UploadRow) -> FileRow:
        part = self.store.upload_path(upload.upload_id)
        digest = hashlib.sha256()
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        file_id = upload.file_id or new_id(12)
        os.replace(part, self.store.blob_path(file_id))
        now = time.time()
        row = FileRow(
            id=file_id,
            display_name=upload.display_name,
            mime_type=upload.mime_type,
            size_bytes=upload.total_bytes,
            sha256=digest.hexdigest(),
            create_time=now,
            update_time=now,
            expiration_time=now + self.config.clock.file_ttl_seconds,
            source="UPLOADED",
            state="ACTIVE",
        )
        self.store.insert_file(row)
        self.store.delete_upload(upload.upload_id)
        self.store.incr("uploads")
        self.store.incr("upload_bytes", upload.total_bytes)
        return row

    def _file_json(
        self, row: FileRow, request: Request, version: str, prefix: str
    ) -> dict[str, Any]:
        base = _base_url(request, prefix)
        body: dict[str, Any] = {"name": f"files/{row.id}"}
        if row.display_name is not None:
            body["displayName"] = row.display_name
        if row.mime_type is not None:
            body["mimeType"] = row.mime_type
        body["sizeBytes"] = int64(row.size_bytes)
        body["createTime"] = timestamp(row.create_time)
        body["updateTime"] = timestamp(row.update_time)
        body["expirationTime"] = timestamp(row.expiration_time)
        if row.sha256:
            body["sha256Hash"] = base64.b64encode(row.sha256.encode()).decode()
        body["uri"] = f"{base}/{version}/files/{row.id}"
        if row.source == "GENERATED":
            body["downloadUri"] = f"{base}/download/{version}/files/{row.id}:download?alt=media"
        body["state"] = row.state
        body["source"] = row.source
        return body

    def _file(self, id: str) -> FileRow:
        """The file, unexpired; else the 403 Google answers for a file that "may not exist"."""
        row = self.store.get_file(id, time.time())
        if row is None:
            raise file_permission_denied(id)
        return row

    def _batch(self, id: str) -> BatchRow:
        row = self.store.get_batch(id)
        if row is None:
            raise not_found()
        return row

    async def _files_get(self, request: Request, version: str, prefix: str, id: str) -> Response:
        row = self._file(id)
        return JSONResponse(self._file_json(row, request, version, prefix))

    async def _files_list(self, request: Request, version: str, prefix: str) -> Response:
        size = self._page_size(request)
        after = _decode_token(request.query_params.get("pageToken"))
        rows = self.store.list_files(after, size + 1, time.time())
        return _page(rows, size, "files", lambda r: self._file_json(r, request, version, prefix))

    async def _files_delete(self, request: Request, version: str, prefix: str, id: str) -> Response:
        self._file(id)
        self.store.delete_file(id)
        self.store.incr("files_deleted")
        return JSONResponse({})

    async def _files_download(
        self, request: Request, version: str, prefix: str, id: str
    ) -> Response:
        row = self._file(id)
        path = self.store.blob_path(id)
        self.store.incr("downloads")
        media_type = "application/octet-stream"
        if row.source == "GENERATED":
            cut = self.faults.truncation()
            if cut is not None:
                self.store.incr("downloads_truncated")
                return _TruncatedResponse(path, row.size_bytes, cut, media_type)
        return FileResponse(path, media_type=media_type)

    def _page_size(self, request: Request) -> int:
        limits = self.config.limits
        text = request.query_params.get("pageSize")
        try:
            size = int(text) if text is not None else limits.page_size_default
        except ValueError:
            raise invalid_argument("pageSize must be an integer.", "page_size") from None
        if size <= 0:
            size = limits.page_size_default
        return min(size, limits.page_size_max)

    # -- batches -----------------------------------------------------------------------
    async def _batches_create(
        self, request: Request, version: str, prefix: str, model: str
    ) -> Response:
        self._check_model(model, version)
        body = await _json_body(request)
        row = await anyio.to_thread.run_sync(self.engine.create, model, body)
        return JSONResponse(self.engine.operation(row, time.time()))

    def _check_model(self, model: str, version: str) -> None:
        if not supports_batch(self.config, model):
            raise model_not_found(model, version, "batchGenerateContent")

    async def _batches_get(self, request: Request, version: str, prefix: str, id: str) -> Response:
        row = self._batch(id)
        if row.source_kind == "inline" and (
            row.final_state is not None or row.generated_successes is not None
        ):
            # The answer may carry the inline results: read them off the event loop.
            operation = await anyio.to_thread.run_sync(self.engine.operation, row, time.time())
        else:
            operation = self.engine.operation(row, time.time())
        return JSONResponse(operation)

    async def _batches_list(self, request: Request, version: str, prefix: str) -> Response:
        if "pageSize" not in request.query_params and (
            self.config.quirks.empty_batch_list_without_page_size
        ):
            return JSONResponse({})
        size = self._page_size(request)
        after = _decode_token(request.query_params.get("pageToken"))
        rows = self.store.list_batches(after, size + 1)
        now = time.time()
        return _page(
            rows,
            size,
            "operations",
            lambda r: self.engine.operation(r, now, with_output=r.source_kind == "file"),
        )

    async def _batches_cancel(
        self, request: Request, version: str, prefix: str, id: str
    ) -> Response:
        row = self._batch(id)
        self.engine.cancel(row)
        self.store.incr("batches_cancelled")
        return JSONResponse({})

    async def _batches_delete(
        self, request: Request, version: str, prefix: str, id: str
    ) -> Response:
        row = self._batch(id)
        was_active = self.engine.view(row, time.time()).state not in TERMINAL
        self.engine.delete(row)
        self.store.incr("batches_deleted")
        if was_active:
            self.store.incr("batches_deleted_while_active")
        return JSONResponse({})

    # -- models ------------------------------------------------------------------------
    async def _models_get(
        self, request: Request, version: str, prefix: str, model: str
    ) -> Response:
        # The rule batches.create uses too (gembatch.emulator.models): a client that checks
        # its model here before uploading is not told yes and then refused by the create,
        # except for a model whose supportedGenerationMethods lack batchGenerateContent.
        if not is_known(self.config, model):
            raise model_not_found(model, version, "getModel")
        return JSONResponse(model_resource(self.config, model))

    async def _models_list(self, request: Request, version: str, prefix: str) -> Response:
        """The configured models (a name accepted by pattern is not listed), paged by
        offset like the real service's opaque tokens."""
        size = self._page_size(request)
        token = request.query_params.get("pageToken") or ""
        if token and not token.isdigit():
            raise invalid_argument("Invalid page token.", "page_token")
        start = int(token or 0)
        names = list(dict.fromkeys([*self.config.models, *self.config.non_batch_models]))
        body: dict[str, Any] = {}
        page = names[start : start + size]
        if page:
            body["models"] = [model_resource(self.config, name) for name in page]
        if start + size < len(names):
            body["nextPageToken"] = str(start + size)
        return JSONResponse(body)

    # -- introspection -----------------------------------------------------------------
    async def _introspection(self, request: Request, path: str) -> Response:
        route = path.removeprefix("/_emulator").strip("/")
        if route == "health":
            return JSONResponse({"status": "ok", "version": __version__})
        if route == "stats" and request.method == "GET":
            return JSONResponse(self.stats())
        if route == "config" and request.method == "GET":
            return JSONResponse(self.config.to_dict())
        if route == "config" and request.method in ("POST", "PUT", "PATCH"):
            try:
                overrides = await _json_body(request)
                self.apply_config(self.config.merged(overrides, "POST /_emulator/config"))
            except ConfigError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except ApiError as exc:
                return _error_response(exc)
            return JSONResponse(self.config.to_dict())
        if route == "reset" and request.method == "POST":
            await anyio.to_thread.run_sync(self.store.wipe)
            return JSONResponse({"status": "reset"})
        return JSONResponse({"error": f"unknown introspection route {path}"}, status_code=404)

    def stats(self) -> dict[str, Any]:
        counters = self.store.counters()
        prefixed: dict[str, dict[str, int]] = {"calls": {}, "faults": {}, "create": {}}
        plain: dict[str, int] = {}
        for name, value in counters.items():
            head, sep, rest = name.partition(":")
            if sep and head in prefixed:
                prefixed[head][rest] = value
            else:
                plain[name] = value
        return {
            "uploads": plain.get("uploads", 0),
            "upload_starts": plain.get("upload_starts", 0),
            "upload_bytes": plain.get("upload_bytes", 0),
            "files_deleted": plain.get("files_deleted", 0),
            "batches_created": plain.get("batches_created", 0),
            "creates_by_display_name": prefixed["create"],
            "batches_cancelled": plain.get("batches_cancelled", 0),
            "batches_deleted": plain.get("batches_deleted", 0),
            "batches_deleted_while_active": plain.get("batches_deleted_while_active", 0),
            "downloads": plain.get("downloads", 0),
            "downloads_truncated": plain.get("downloads_truncated", 0),
            "calls": prefixed["calls"],
            "faults": prefixed["faults"],
            "files": self.store.count_files(),
            "batches": self.store.batch_state_counts(),
        }


class _TruncatedResponse(Response):
    """A download cut short: either the connection drops or the body silently ends early."""

    def __init__(self, path: Path, size: int, cut: Truncation, media_type: str) -> None:
        super().__init__(media_type=media_type)
        self.mime = media_type
        self.path = path
        self.size = size
        self.cut = cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        data = await anyio.to_thread.run_sync(self.path.read_bytes)
        sent = data[: int(len(data) * self.cut.fraction)]
        if self.cut.mode == "silent":
            sent = sent[: sent.rfind(b"\n") + 1]
            length = len(sent)
        else:
            length = len(data)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", self.mime.encode()),
                    (b"content-length", str(length).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": sent, "more_body": True})
        if self.cut.mode == "silent":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # In "abort" mode we return without finishing: the server closes the connection
        # and the client sees fewer bytes than Content-Length promised.


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.http_status, headers=error.headers)


async def _json_body(request: Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise invalid_argument("Request body is empty; a JSON object is required.")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise invalid_argument(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(body, dict):
        raise invalid_argument("Invalid JSON payload received. Expected an object.")
    return body


def _base_url(request: Request, prefix: str) -> str:
    host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
    return f"{request.url.scheme}://{host}{prefix}"


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
        handle.truncate()


def _page(
    rows: list[_Row], size: int, field: str, render: Callable[[_Row], dict[str, Any]]
) -> JSONResponse:
    """A list call's answer: the first `size` of `rows` (read with one more, to know
    whether there is a next page) under `field`, then the next page's token if any."""
    body: dict[str, Any] = {}
    if rows[:size]:
        body[field] = [render(r) for r in rows[:size]]
    if len(rows) > size:
        last = rows[size - 1]
        body["nextPageToken"] = _encode_token(last.create_time, last.id)
    return JSONResponse(body)


def _encode_token(create_time: float, item_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([create_time, item_id]).encode()).decode()


def _decode_token(token: str | None) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(value[0]), str(value[1])
    except (ValueError, TypeError, IndexError, KeyError):
        raise invalid_argument("Invalid page token.", "page_token") from None
