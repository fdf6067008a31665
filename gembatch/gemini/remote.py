"""Everything gembatch asks of Gemini, async, through the official google-genai SDK.

Why: the engine polls hundreds of batches at once, needs the request counts and the
failure reason that the SDK's typed `BatchJob` drops, and must never mistake a cut
download for a complete one. `Remote` owns one SDK client on an httpx2 connection pool
(the SDK's own HTTP stack; its pool costs a fraction of httpx 0.28's per request when
hundreds of calls are in flight) sized to its concurrency, reads the raw Operation JSON
through a response hook,
bounds every call with a semaphore, and lets errors through unretried: the engine
classifies them (gembatch.gemini.errors) and decides retries (gembatch.retry).
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import itertools
import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import httpcore2
import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from gembatch.gemini.errors import classify, is_missing_file
from gembatch.jobs import RemoteState, RequestCounts

PAGE_SIZE = 100  # the API's maximum page size for files and batches
CONNECTIONS_PER_POOL = 4
WRITE_BEHIND = 16 * 1024 * 1024  # a download is flushed to disk this often, in the background

T = TypeVar("T")

# httpcore2 reads a response body 64 KiB at a time, each read with its own cancel scope
# and h11 event: a 1 GiB download spent most of a core there. A read returns what the
# socket has, never more than asked, so allowing 1 MiB changes nothing for small answers
# and made a 1 GiB download ~30% faster (bench/bench_download.py). httpcore2 reads the
# size from the connection class and has no per-pool setting.
_READ_SIZE = 1024 * 1024
if getattr(httpcore2.AsyncHTTP11Connection, "READ_NUM_BYTES", _READ_SIZE) < _READ_SIZE:
    httpcore2.AsyncHTTP11Connection.READ_NUM_BYTES = _READ_SIZE

# Raw Operation JSON seen by the response hook during the current call, by batch name.
# A context variable (not a shared dict) ties each response to the call that made it:
# the hook runs inside the task that awaits the SDK, so 1,000 concurrent `get_batch`
# calls never see each other's bodies and nothing is left behind when a call fails.
_raw_operations: contextvars.ContextVar[dict[str, dict[str, Any]] | None] = contextvars.ContextVar(
    "gembatch_raw_operations", default=None
)
# /v1beta/batches/<id>, /v1/batches (list), /v1/models/<m>:batchGenerateContent
_BATCH_PATH = re.compile(r"/v1[a-z0-9]*/(?:batches(?:/[^/:]+)?|models/[^/]+:batchGenerateContent)$")


@dataclass
class RemoteBatch:
    """A remote batch as gembatch sees it: the SDK's typed fields plus what only the raw
    response carries (request counts, the input file, the Operation's error)."""

    name: str
    display_name: str | None
    model: str | None
    state: RemoteState
    counts: RequestCounts = field(default_factory=RequestCounts)
    output_file: str | None = None
    # metadata.inputConfig.fileName ("files/<id>"): the uploaded file the batch reads;
    # None for inline batches. The SDK's typed BatchJob drops it.
    input_file: str | None = None
    create_time: str | None = None
    update_time: str | None = None
    end_time: str | None = None
    error: dict[str, Any] | None = None

    def to_batch_dict(self) -> dict[str, Any]:
        """The seed-002 `batch` record, plus `stats` and (when present) `error`."""
        data: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "model": self.model,
            "state": self.state.value,
        }
        for key in ("create_time", "update_time", "end_time"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.output_file:
            data["dest"] = {"file_name": self.output_file}
        data["stats"] = self.counts.to_dict()
        if self.error:
            data["error"] = self.error
        return data


class Remote:
    """The Gemini Files and Batch API (or the emulator), for one event loop."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        concurrency: int = 32,
        timeout: float = 120.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._semaphore = asyncio.Semaphore(concurrency)
        self.timeout = timeout  # seconds; also the server's own limit (X-Server-Timeout)
        # Calls and failures by SDK method, for `/metrics` (seed 004's resource monitoring).
        self.stats: dict[str, Counter[str]] = {"calls": Counter(), "errors": Counter()}
        # Several small pools rather than one big one: httpcore scans every connection of
        # a pool (probing each socket) whenever a request starts, so a pool of 32 costs
        # ~4x a pool of 8 per request. Calls go round-robin over the shards.
        shards = max(1, math.ceil(concurrency / CONNECTIONS_PER_POOL))
        per_pool = math.ceil(concurrency / shards)
        self._pools: list[httpx2.AsyncClient] = []
        self._clients: list[genai.Client] = []
        for _ in range(shards):
            # Our own pool, with the hook that captures raw JSON. The SDK detects an
            # httpx2 client and uses it as given; it never closes a client it did not
            # create, so `aclose` does.
            pool = httpx2.AsyncClient(
                limits=httpx2.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                timeout=timeout,
                event_hooks={"response": [_capture_operation]},
            )
            # The SDK passes HttpOptions.timeout (ms) on every request, overriding the
            # client's default; without it a request could wait forever. No
            # retry_options: the SDK makes one attempt, the engine decides retries.
            options = types.HttpOptions(
                base_url=base_url,
                httpx_async_client=pool,
                timeout=max(1, round(timeout * 1000)),
            )
            # Kept for the Remote's lifetime: the SDK closes its transports when the
            # Client is garbage collected.
            self._pools.append(pool)
            self._clients.append(genai.Client(api_key=api_key, http_options=options))
        self._next = itertools.cycle(self._clients)

    @property
    def _client(self) -> genai.Client:
        """The SDK client for the next call (round-robin over the pools)."""
        return next(self._next)

    # -- files -------------------------------------------------------------------------
    async def upload(
        self, source: BinaryIO, size: int, display_name: str, mime_type: str = "jsonl"
    ) -> str:
        """Upload `size` bytes of `source` from its current position; returns "files/<id>"."""
        window = _Window(source, size)
        config: types.UploadFileConfigDict = {"mime_type": mime_type, "display_name": display_name}
        uploaded = await self._call(
            "files.upload", lambda: self._client.aio.files.upload(file=window, config=config)
        )
        if not uploaded.name:
            raise RuntimeError("the upload answered without a file name")
        return uploaded.name

    async def find_files(self, display_names: Collection[str]) -> dict[str, str]:
        """display_name -> "files/<id>" for the wanted names, over every page of files."""
        wanted = set(display_names)
        found: dict[str, str] = {}
        for item in await self._list_files_typed():
            if item.display_name in wanted and item.name and item.display_name not in found:
                found[item.display_name] = item.name
        return found

    async def list_files(self) -> list[dict[str, Any]]:
        """Every file of the project (all pages)."""
        return [
            {
                "name": item.name,
                "display_name": item.display_name,
                "size_bytes": item.size_bytes,
                "source": _enum_text(item.source),
                "create_time": _iso(item.create_time),
            }
            for item in await self._list_files_typed()
        ]

    async def delete_file(self, name: str) -> bool:
        """Delete a file; False if it was already gone (Google says 403 "may not exist")."""
        try:
            await self._call("files.delete", lambda: self._client.aio.files.delete(name=name))
        except genai_errors.ClientError as exc:
            if exc.code == 404 or is_missing_file(exc):
                return False
            raise
        return True

    async def download(self, file_name: str, destination: BinaryIO) -> int:
        """Stream a file's bytes into `destination` (flat memory); returns the bytes
        written. A connection cut mid-body raises: a short copy never looks complete.

        The request is the one the SDK's `files.download` sends (the SDK builds it), read
        from our pool chunk by chunk as they arrive: the SDK's own download re-chunks the
        body into 1 MiB pieces in Python, a copy of every byte. When `destination` is a
        file, what has arrived is flushed to disk every WRITE_BEHIND bytes in the
        background, so the kernel writes while the network reads: at the end the caller's
        fsync of a 1 GiB file took 0.1 s instead of 1.4-2.5 s (bench/bench_download.py)."""
        return await self._call("files.download", lambda: self._stream(file_name, destination))

    async def _stream(self, file_name: str, destination: BinaryIO) -> int:
        client = self._client
        # The SDK's own request (URL, API version, key and client headers), as its
        # files.download would send it.
        request = client._api_client._build_request(
            "get", f"files/{file_name.removeprefix('files/')}:download?alt=media", {}, None
        )
        pool = self._pools[self._clients.index(client)]
        written = synced = 0
        syncing: asyncio.Future[None] | None = None
        fd = _fileno(destination)
        try:
            async with pool.stream("GET", request.url, headers=request.headers) as response:
                await genai_errors.APIError.raise_for_async_response(response)
                async for chunk in response.aiter_bytes():  # decoded, as they arrive
                    destination.write(chunk)
                    written += len(chunk)
                    due = written - synced >= WRITE_BEHIND
                    if fd is not None and due and (syncing is None or syncing.done()):
                        if syncing is not None:
                            syncing.result()  # a failed flush fails the download
                        destination.flush()
                        synced = written
                        syncing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, fd))
        finally:
            if syncing is not None:
                # Never leave a flush running on a descriptor the caller is about to close.
                await asyncio.wait([syncing])
        if syncing is not None:
            syncing.result()  # an I/O error seen here would not be reported again by fsync
        return written

    # -- models ------------------------------------------------------------------------
    async def get_model(self, name: str, timeout: float | None = None) -> types.Model:
        """models.get: the model's resource, or the SDK's ClientError (404 for a model the
        API does not serve). `timeout` (seconds) overrides the Remote's for this call.
        Errors pass through unretried, like every call here."""
        config: types.GetModelConfigDict = {}
        if timeout is not None:
            config["http_options"] = {"timeout": max(1, round(timeout * 1000))}
        return await self._call(
            "models.get", lambda: self._client.aio.models.get(model=name, config=config or None)
        )

    # -- batches -----------------------------------------------------------------------
    async def create_batch(self, model: str, file_name: str, display_name: str) -> RemoteBatch:
        """batches.create from an uploaded file. Not idempotent: on an error that is not
        definitive, reconcile with `find_batches` before creating again."""
        config: types.CreateBatchJobConfigDict = {"display_name": display_name}
        job, raw = await self._call_capturing(
            "batches.create",
            lambda: self._client.aio.batches.create(model=model, src=file_name, config=config),
        )
        return _remote_batch(job, raw.get(job.name or ""))

    async def get_batch(self, name: str) -> RemoteBatch:
        job, raw = await self._call_capturing(
            "batches.get", lambda: self._client.aio.batches.get(name=name)
        )
        return _remote_batch(job, raw.get(job.name or name))

    async def find_batches(self, display_names: Collection[str]) -> dict[str, RemoteBatch]:
        """display_name -> batch for the wanted names, over every page of batches. Used to
        reconcile a create whose outcome is unknown. If a name matches several batches
        (a create that went through twice), the earliest created is returned."""
        wanted = set(display_names)
        found: dict[str, RemoteBatch] = {}
        for batch in await self.list_batches():
            if batch.display_name not in wanted:
                continue
            known = found.get(batch.display_name)
            if known is None or (batch.create_time or "") < (known.create_time or ""):
                found[batch.display_name] = batch
        return found

    async def list_batches(self) -> list[RemoteBatch]:
        """Every batch of the project (all pages), with request counts."""

        async def collect() -> list[Any]:
            pager = await self._client.aio.batches.list(config={"page_size": PAGE_SIZE})
            return [job async for job in pager]

        jobs, raw = await self._call_capturing("batches.list", collect)
        return [_remote_batch(job, raw.get(job.name or "")) for job in jobs]

    async def cancel_batch(self, name: str) -> None:
        await self._call("batches.cancel", lambda: self._client.aio.batches.cancel(name=name))

    async def delete_batch(self, name: str) -> bool:
        """Delete a batch; False if it was already gone (404)."""
        try:
            await self._call("batches.delete", lambda: self._client.aio.batches.delete(name=name))
        except genai_errors.ClientError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aio.aclose()
            client.close()
        for pool in self._pools:
            await pool.aclose()

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- helpers -----------------------------------------------------------------------
    def stats_snapshot(self) -> dict[str, dict[str, int]]:
        """A copy of the counters: {"calls": {method: n}, "errors": {error class: n}}."""
        return {kind: dict(counter) for kind, counter in self.stats.items()}

    async def _call(self, method: str, make: Callable[[], Awaitable[T]]) -> T:
        """Every Gemini call passes here: bounded by the semaphore, and counted."""
        async with self._semaphore:
            self.stats["calls"][method] += 1
            try:
                return await make()
            except Exception as exc:  # counted, then passed on untouched
                self.stats["errors"][classify(exc).error_class.value] += 1
                raise

    async def _call_capturing(
        self, method: str, make: Callable[[], Awaitable[T]]
    ) -> tuple[T, dict[str, dict[str, Any]]]:
        """Run an SDK call and return its result with the raw Operations it received."""
        captured: dict[str, dict[str, Any]] = {}
        token = _raw_operations.set(captured)
        try:
            result = await self._call(method, make)
        finally:
            _raw_operations.reset(token)
        return result, captured

    async def _list_files_typed(self) -> list[types.File]:
        async def collect() -> list[types.File]:
            pager = await self._client.aio.files.list(config={"page_size": PAGE_SIZE})
            return [item async for item in pager]

        return await self._call("files.list", collect)


async def _capture_operation(response: httpx2.Response) -> None:
    """httpx response hook: keep the raw Operation JSON of batch calls made by a
    `_call_capturing` caller (the SDK's typed object drops batchStats and error)."""
    captured = _raw_operations.get()
    if captured is None or response.status_code != 200:
        return
    if not _BATCH_PATH.search(response.request.url.path):
        return
    await response.aread()  # cached: the SDK reads the same bytes afterwards
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return  # the SDK reports the bad body itself
    if not isinstance(body, dict):
        return
    operations = body.get("operations") if "operations" in body else [body]
    for operation in operations or []:
        if isinstance(operation, dict) and isinstance(operation.get("name"), str):
            captured[operation["name"]] = operation


def _remote_batch(job: types.BatchJob, raw: dict[str, Any] | None) -> RemoteBatch:
    raw = raw or {}
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    error = raw.get("error")
    config = metadata.get("inputConfig") or metadata.get("input_config")
    input_file = None
    if isinstance(config, dict):
        input_file = config.get("fileName") or config.get("file_name")
    return RemoteBatch(
        name=job.name or str(raw.get("name") or ""),
        display_name=job.display_name,
        model=job.model,
        state=RemoteState.parse(job.state),
        counts=_counts(metadata.get("batchStats")),
        output_file=job.dest.file_name if job.dest and job.dest.file_name else None,
        input_file=input_file if isinstance(input_file, str) and input_file else None,
        create_time=_iso(job.create_time),
        update_time=_iso(job.update_time),
        end_time=_iso(job.end_time),
        error=error if isinstance(error, dict) and error else None,
    )


def _counts(stats: Any) -> RequestCounts:
    """batchStats: int64 strings, zero counts omitted."""
    if not isinstance(stats, dict):
        return RequestCounts()

    def number(*keys: str) -> int:
        for key in keys:
            value = stats.get(key)
            if value is None:
                continue
            try:
                return int(value)
            except (TypeError, ValueError):
                return 0
        return 0

    return RequestCounts(
        total=number("requestCount", "request_count"),
        succeeded=number("successfulRequestCount", "successful_request_count"),
        failed=number("failedRequestCount", "failed_request_count"),
    )


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def _enum_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


class _Window(io.RawIOBase):
    """`size` bytes of a seekable binary stream, from its position at construction, as a
    stream of exactly that size: the SDK sizes an upload by seeking to the end, and a
    source that ends early raises instead of leaving the upload unfinalized."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError("upload size must be >= 0")
        self._source = source
        self._start = source.tell()
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        self._pos = min(max(0, pos), self._size)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        self._source.seek(self._start + self._pos)
        got = 0
        while got < want:
            chunk = self._source.read(want - got)
            if not chunk:
                raise EOFError(f"the upload source ended at byte {self._pos + got} of {self._size}")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self._pos += got
        return got


def _fileno(destination: BinaryIO) -> int | None:
    """The destination's file descriptor, or None for an in-memory or odd stream."""
    try:
        fd = destination.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None
    try:
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
