"""Batch lifecycle: create-time parsing, the state clock, output generation, finalization.

Why: a batch must move PENDING -> RUNNING -> terminal on a configurable clock, show
request counts that move while it runs, survive an emulator restart, and end with one
output line per input request in a shuffled order, as Google's do. State is derived from
timestamps stored at create, so nothing needs a timer to stay correct; a worker thread
generates the output once the batch starts running, and the first observer after the
clock's end publishes it. The sweeper (`tick`) visits a batch only at the instants its
clock changes (a heap of due times), so 100,000 pending batches cost it nothing.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import json
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gembatch.emulator.directives import fail_first
from gembatch.emulator.faults import FaultInjector
from gembatch.emulator.responders import Reply, Responder
from gembatch.emulator.store import BatchRow, FileRow, Store
from gembatch.emulator.wire import (
    file_permission_denied,
    get_field,
    int64,
    invalid_argument,
    new_id,
    resource_exhausted,
    timestamp,
)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
# A polled batch shows the same few instants again and again: format each once.
_timestamp = functools.lru_cache(maxsize=1 << 16)(timestamp)
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
_INLINE_ITEM_FIELDS = {"request", "metadata"}


@dataclass
class View:
    """What a batch looks like at one instant."""

    state: str
    end_time: float | None
    succeeded: int
    failed: int
    pending: int


@dataclass
class ParsedInput:
    request_count: int
    failing: list[int]
    estimated_tokens: int
    forced: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The live knobs the lifecycle reads (replaced when the config changes at runtime)."""

    pending_s: float
    running_s: float
    expire_s: float
    file_ttl_s: float
    shuffle: bool
    seed: int
    max_active: int
    max_enqueued_tokens: int | None
    max_inline_bytes: int
    actual_progress: bool
    concurrency: int


class BatchEngine:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        responder: Callable[[], Responder],
        faults: Callable[[], FaultInjector],
    ) -> None:
        self.store = store
        self._settings = settings
        self._responder = responder
        self._faults = faults
        self._lock = threading.RLock()
        self._generating: dict[str, threading.Event] = {}  # batch id -> stop flag
        self._progress: dict[str, tuple[int, int]] = {}  # batch id -> (done, failed)
        self._orders: OrderedDict[tuple[str, int], list[int]] = OrderedDict()
        # batch id -> sorted output positions of its error lines (fixed at create).
        self._failing: OrderedDict[tuple[str, int], list[int]] = OrderedDict()
        # (when, batch id): instants at which `tick` must look at a batch; None until the
        # first tick loads every unfinished batch.
        self._due: list[tuple[float, str]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-gen")

    def close(self) -> None:
        with self._lock:
            for stop in self._generating.values():
                stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- create ------------------------------------------------------------------------
    def create(self, model: str, body: dict[str, Any]) -> BatchRow:
        settings = self._settings()
        batch = get_field(body, "batch")
        if not isinstance(batch, dict):
            raise invalid_argument("Request must contain a `batch` object.", "batch")
        display_name = get_field(batch, "displayName")
        if display_name is not None and not isinstance(display_name, str):
            raise invalid_argument("batch.display_name must be a string.", "batch.display_name")
        input_config = get_field(batch, "inputConfig")
        if not isinstance(input_config, dict):
            raise invalid_argument(
                "batch.input_config is required: give a file_name or inline requests.",
                "batch.input_config",
            )
        priority = get_field(batch, "priority")
        try:
            priority = int(priority) if priority is not None else None
        except (TypeError, ValueError):
            raise invalid_argument("batch.priority must be an integer.", "batch.priority") from None

        batch_id = new_id(36)
        file_name = get_field(input_config, "fileName")
        requests = get_field(input_config, "requests")
        if file_name is not None:
            source_kind, input_file = "file", str(file_name)
            parsed = self._parse_file(input_file, batch_id)
        elif requests is not None:
            source_kind, input_file = "inline", None
            parsed = self._parse_inline(requests, batch_id, settings)
        else:
            raise invalid_argument(
                "batch.input_config needs either file_name or requests.", "batch.input_config"
            )

        try:
            self._check_quota(model, parsed.estimated_tokens, settings)
            seq = self.store.incr("batches_created")
            now = time.time()
            row = BatchRow(
                id=batch_id,
                seq=seq,
                display_name=display_name,
                model=model,
                create_time=now,
                update_time=now,
                source_kind=source_kind,
                input_file=input_file,
                request_count=parsed.request_count,
                failing=json.dumps(parsed.failing),
                estimated_tokens=parsed.estimated_tokens,
                outcome=self._faults().batch_outcome(seq, display_name or ""),
                pending_s=settings.pending_s,
                running_s=settings.running_s,
                expire_s=settings.expire_s,
                priority=priority,
                cancel_time=None,
                final_state=None,
                end_time=None,
                output_file=None,
                generated_successes=None,
                generated_failures=None,
                forced=json.dumps(parsed.forced),
            )
            self.store.insert_batch(row)
        except BaseException:
            self.store.batch_input_path(batch_id).unlink(missing_ok=True)
            raise
        self.store.incr(f"create:{display_name or ''}")
        self._wake(batch_id, now)
        return row

    def _check_quota(self, model: str, tokens: int, settings: Settings) -> None:
        # Batches without a final state bound the active ones from above (a few may have
        # ended on the clock, not yet published): only near a limit is the exact count, a
        # look at each of them, needed. Otherwise a create would cost O(active batches).
        if self.store.count_unfinished() >= settings.max_active:
            unfinished = self.store.unfinished_batches()
            active = sum(1 for b in unfinished if not self._is_done(b))
            if active >= settings.max_active:
                raise resource_exhausted(
                    f"Too many concurrent batch jobs: at most {settings.max_active} may be "
                    "pending or running at once.",
                    retry_after=5.0,
                )
        if settings.max_enqueued_tokens is not None:
            same_model = [b for b in self.store.unfinished_batches() if b.model == model]
            if sum(b.estimated_tokens for b in same_model) + tokens <= settings.max_enqueued_tokens:
                return
            enqueued = sum(b.estimated_tokens for b in same_model if not self._is_done(b)) + tokens
            if enqueued > settings.max_enqueued_tokens:
                raise resource_exhausted(
                    f"Enqueued token limit exceeded for {model}: {enqueued} tokens would be "
                    f"enqueued, the limit is {settings.max_enqueued_tokens}.",
                    retry_after=30.0,
                )

    def _is_done(self, row: BatchRow) -> bool:
        return self.view(row, time.time(), publish=False).state in TERMINAL

    def _parse_file(self, file_name: str, batch_id: str) -> ParsedInput:
        file_id = file_name.removeprefix("files/")
        file_row = self.store.get_file(file_id, time.time())
        if file_row is None:
            raise file_permission_denied(file_id)
        source = self.store.blob_path(file_id)
        snapshot = self.store.batch_input_path(batch_id)
        # A hard link keeps the input readable even if the user deletes the file meanwhile.
        try:
            os.link(source, snapshot)
        except OSError:
            import shutil

            shutil.copyfile(source, snapshot)
        try:
            return self._scan_jsonl(snapshot, file_name)
        except BaseException:
            snapshot.unlink(missing_ok=True)
            raise

    def _scan_jsonl(self, path: Path, file_name: str) -> ParsedInput:
        responder = self._responder()
        count = 0
        failing: list[int] = []
        forced: list[int] = []
        tokens = 0
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise invalid_argument(
                        f"Input file {file_name} is not valid UTF-8 (line {number}).",
                        "batch.input_config.file_name",
                    ) from None
                try:
                    line = json.loads(text)
                except ValueError as exc:
                    raise invalid_argument(
                        f"Input file {file_name} has invalid JSON on line {number}: {exc}.",
                        "batch.input_config.file_name",
                    ) from None
                if not isinstance(line, dict):
                    raise invalid_argument(
                        f"Input file {file_name} line {number} is not a JSON object.",
                        "batch.input_config.file_name",
                    )
                request = line.get("request")
                if request is None or responder.predict_error(request):
                    failing.append(count)
                elif self._flaky_fails(request):
                    forced.append(count)
                tokens += max(1, len(raw) // 4)
                count += 1
        if count == 0:
            raise invalid_argument(
                f"Input file {file_name} contains no requests.", "batch.input_config.file_name"
            )
        return ParsedInput(count, failing, tokens, forced)

    def _flaky_fails(self, request: Any) -> bool:
        """`[[emulator:fail-first=N]]`: fail in the first N batches holding this request."""
        times = fail_first(request)
        if times is None:
            return False
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        return self.store.incr(f"flaky:{digest[:24]}") <= times

    def _parse_inline(self, requests: Any, batch_id: str, settings: Settings) -> ParsedInput:
        items = get_field(requests, "requests") if isinstance(requests, dict) else None
        if not isinstance(items, list) or not items:
            raise invalid_argument(
                "batch.input_config.requests.requests must be a non-empty list.",
                "batch.input_config.requests.requests",
            )
        encoded = json.dumps(items).encode()
        if len(encoded) > settings.max_inline_bytes:
            raise invalid_argument(
                f"Inline batch requests are {len(encoded)} bytes; the limit is "
                f"{settings.max_inline_bytes} bytes. Upload a JSONL file instead.",
                "batch.input_config.requests",
            )
        responder = self._responder()
        failing: list[int] = []
        forced: list[int] = []
        for index, item in enumerate(items):
            where = f"batch.input_config.requests.requests[{index}]"
            if not isinstance(item, dict):
                raise invalid_argument(f"Invalid value at '{where}': expected an object.", where)
            for name in item:
                if name not in _INLINE_ITEM_FIELDS:
                    raise invalid_argument(
                        f'Invalid JSON payload received. Unknown name "{name}" at '
                        f"'{where}': Cannot find field.",
                        where,
                    )
            metadata = item.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise invalid_argument(f"'{where}.metadata' must be an object.", where)
            request = item.get("request")
            if request is None or responder.predict_error(request):
                failing.append(index)
            elif self._flaky_fails(request):
                forced.append(index)
        self.store.batch_input_path(batch_id).write_bytes(encoded)
        return ParsedInput(len(items), failing, max(1, len(encoded) // 4), forced)

    # -- state -------------------------------------------------------------------------
    def view(self, row: BatchRow, now: float, publish: bool = True) -> View:
        """The batch at `now`; with `publish`, record a terminal state the first time."""
        n = row.request_count
        if row.final_state is not None:
            return self._terminal_view(row)
        created = row.create_time
        expire_at = created + row.expire_s
        pending_end = created + row.pending_s
        run_end = pending_end + row.running_s
        if row.outcome == "EXPIRED" or run_end > expire_at:
            if now >= expire_at:
                return self._publish(row, "EXPIRED", expire_at, publish)
            if row.outcome == "EXPIRED":
                return View("PENDING", None, 0, 0, n)
        if now < pending_end:
            return View("PENDING", None, 0, 0, n)
        if now < run_end:
            return self._running_view(row, (now - pending_end) / max(row.running_s, 1e-9))
        if row.outcome == "FAILED":
            return self._publish(row, "FAILED", run_end, publish)
        if row.generated_successes is None:
            return self._running_view(row, 1.0)
        if publish:
            self.finalize_success(row, max(run_end, row.update_time))
            fresh = self.store.get_batch(row.id)
            if fresh is not None and fresh.final_state is not None:
                return self._terminal_view(fresh)
        return View(
            "SUCCEEDED",
            max(run_end, row.update_time),
            row.generated_successes or 0,
            row.generated_failures or 0,
            0,
        )

    def _running_view(self, row: BatchRow, fraction: float) -> View:
        n = row.request_count
        settings = self._settings()
        if settings.actual_progress:
            done, failed = self._progress.get(row.id, (0, 0))
            return View("RUNNING", None, done - failed, failed, n - done)
        done = min(n, int(fraction * n))
        failing_positions = self._failing_positions(row)
        failed = bisect.bisect_left(failing_positions, done)
        return View("RUNNING", None, done - failed, failed, n - done)

    def _terminal_view(self, row: BatchRow) -> View:
        n = row.request_count
        state = row.final_state or "SUCCEEDED"
        if state == "SUCCEEDED":
            return View(
                state, row.end_time, row.generated_successes or 0, row.generated_failures or 0, 0
            )
        if state == "FAILED":
            return View(state, row.end_time, 0, n, 0)
        if state == "CANCELLED" and row.cancel_time is not None:
            fraction = (row.cancel_time - row.create_time - row.pending_s) / max(
                row.running_s, 1e-9
            )
            done = min(n, max(0, int(fraction * n)))
            failed = bisect.bisect_left(self._failing_positions(row), done)
            return View(state, row.end_time, done - failed, failed, n - done)
        return View(state, row.end_time, 0, 0, n)

    def _publish(self, row: BatchRow, state: str, end: float, publish: bool) -> View:
        if publish and self.store.finalize_batch(row.id, final_state=state, end_time=end):
            self._stop_generation(row.id)
            self._discard_work(row.id)
        return self._terminal_view(
            BatchRow(**{**row.__dict__, "final_state": state, "end_time": end})
        )

    def _order(self, row: BatchRow) -> list[int]:
        """The processing (and output) order of the inputs: a seeded shuffle."""

        def shuffled() -> list[int]:
            order = list(range(row.request_count))
            if self._settings().shuffle:
                random.Random(f"{self._settings().seed}:{row.id}").shuffle(order)
            return order

        return self._cached(self._orders, 64, (row.id, row.request_count), shuffled)

    def _failing_positions(self, row: BatchRow) -> list[int]:
        """Output positions of the error lines, sorted (cached: polls ask all the time)."""

        def positions() -> list[int]:
            failing = row.failing_indices()
            if not failing:
                return []
            position = {index: pos for pos, index in enumerate(self._order(row))}
            return sorted(position[i] for i in failing)

        return self._cached(self._failing, 100_000, (row.id, row.request_count), positions)

    def _cached(
        self,
        cache: OrderedDict[tuple[str, int], list[int]],
        size: int,
        key: tuple[str, int],
        compute: Callable[[], list[int]],
    ) -> list[int]:
        """`cache[key]`, computed outside the lock on a miss; the `size` most recently used
        entries are kept."""
        with self._lock:
            value = cache.get(key)
            if value is not None:
                cache.move_to_end(key)
                return value
        value = compute()
        with self._lock:
            cache[key] = value
            while len(cache) > size:
                cache.popitem(last=False)
        return value

    # -- cancel / delete ---------------------------------------------------------------
    def cancel(self, row: BatchRow) -> None:
        now = time.time()
        if self.view(row, now).state in TERMINAL:
            return
        if self.store.finalize_batch(
            row.id, final_state="CANCELLED", end_time=now, cancel_time=now
        ):
            self._stop_generation(row.id)
            self._discard_work(row.id)

    def delete(self, row: BatchRow) -> None:
        self._stop_generation(row.id)
        self.store.delete_batch(row.id)
        self._discard_work(row.id)
        self.store.inline_output_path(row.id).unlink(missing_ok=True)
        with self._lock:
            self._failing.pop((row.id, row.request_count), None)

    def _stop_generation(self, batch_id: str) -> None:
        with self._lock:
            stop = self._generating.get(batch_id)
        if stop is not None:
            stop.set()

    def _discard_work(self, batch_id: str) -> None:
        for path in (
            self.store.batch_input_path(batch_id),
            self.store.batch_partial_path(batch_id),
            self._done_path(batch_id),
        ):
            path.unlink(missing_ok=True)

    def _done_path(self, batch_id: str) -> Path:
        return self.store.batch_partial_path(batch_id).with_suffix(".done")

    # -- generation --------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Start output generation for batches that are running; publish finished ones.
        Looks only at the batches whose clock has reached one of its instants."""
        now = time.time() if now is None else now
        with self._lock:
            if self._due is None:
                self._due = [(now, row.id) for row in self.store.unfinished_batches()]
                heapq.heapify(self._due)
            ready: dict[str, None] = {}
            while self._due and self._due[0][0] <= now:
                ready[heapq.heappop(self._due)[1]] = None
        for batch_id in ready:
            row = self.store.unfinished_batch(batch_id)
            if row is None:
                continue  # finished, cancelled or deleted meanwhile
            view = self.view(row, now)
            if view.state in TERMINAL:
                continue
            started = now >= row.create_time + row.pending_s
            if (
                started
                and row.outcome == "SUCCEEDED"
                and row.generated_successes is None
                and row.cancel_time is None
            ):
                self._start_generation(row)
            self._wake(batch_id, _next_instant(row, now))

    def _wake(self, batch_id: str, when: float) -> None:
        """Have `tick` look at this batch at `when`."""
        with self._lock:
            if self._due is not None:
                heapq.heappush(self._due, (when, batch_id))

    def _start_generation(self, row: BatchRow) -> None:
        with self._lock:
            if row.id in self._generating:
                return
            stop = threading.Event()
            self._generating[row.id] = stop
        self._pool.submit(self._generate_safely, row, stop)

    def _generate_safely(self, row: BatchRow, stop: threading.Event) -> None:
        try:
            self._generate(row, stop)
        except Exception as exc:  # a generation bug must not kill the worker thread
            import traceback

            traceback.print_exc()
            self.store.incr("generation_errors")
            print(f"emulator: output generation for batches/{row.id} failed: {exc}", flush=True)
        finally:
            with self._lock:
                self._generating.pop(row.id, None)
            # Publish (or, after an error, start again) soon, not at a clock instant.
            self._wake(row.id, time.time() + 0.1)

    def _generate(self, row: BatchRow, stop: threading.Event) -> None:
        settings = self._settings()
        responder = self._responder()
        order = self._order(row)
        if row.source_kind == "inline":
            items = json.loads(self.store.batch_input_path(row.id).read_bytes())
            self._generate_inline(row, items, order, responder, settings, stop)
            return
        spans = _line_spans(self.store.batch_input_path(row.id))
        partial = self.store.batch_partial_path(row.id)
        start = _complete_lines(partial)
        failed = _count_errors(partial)
        self._progress[row.id] = (start, failed)
        rng = random.Random(f"{settings.seed}:{row.id}:keys")
        for _ in range(start):
            rng.random()  # keep the key-order choices of a resumed run identical
        with open(self.store.batch_input_path(row.id), "rb") as source, open(partial, "ab") as out:
            fd = source.fileno()
            forced = set(row.forced_indices())

            def work(position: int) -> tuple[str | None, Reply]:
                offset, length = spans[order[position]]
                raw = os.pread(fd, length, offset)
                if order[position] in forced:
                    return _key_of(raw), Reply(error=dict(_FLAKY_ERROR))
                return _answer_line(raw, row.model, responder)

            for position, (key, reply) in _ordered_map(
                work, range(start, len(order)), settings.concurrency, stop
            ):
                line = _output_line(key, reply, rng.random() < 0.5)
                out.write(line)
                failed += reply.error is not None
                self._progress[row.id] = (position + 1, failed)
            out.flush()
            os.fsync(out.fileno())
        if stop.is_set():
            return
        os.replace(partial, self._done_path(row.id))
        done = self._progress.pop(row.id, (len(order), failed))
        self.store.update_batch(
            row.id, generated_successes=done[0] - done[1], generated_failures=done[1]
        )

    def _generate_inline(
        self,
        row: BatchRow,
        items: list[dict[str, Any]],
        order: list[int],
        responder: Responder,
        settings: Settings,
        stop: threading.Event,
    ) -> None:
        results: list[dict[str, Any]] = []
        failed = 0

        forced = set(row.forced_indices())

        def work(position: int) -> tuple[dict[str, Any], Reply]:
            item = items[order[position]]
            if order[position] in forced:
                return item, Reply(error=dict(_FLAKY_ERROR))
            request = item.get("request")
            if request is None:
                return item, Reply(error={"code": 3, "message": "request is required."})
            return item, responder.reply(request, row.model)

        for position, (item, reply) in _ordered_map(
            work, range(len(order)), settings.concurrency, stop
        ):
            entry: dict[str, Any] = {}
            if reply.error is not None:
                entry["error"] = reply.error
                failed += 1
            else:
                entry["response"] = reply.response
            if item.get("metadata") is not None:
                entry["metadata"] = item["metadata"]
            results.append(entry)
            self._progress[row.id] = (position + 1, failed)
        if stop.is_set():
            return
        target = self.store.inline_output_path(row.id)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, target)
        self._progress.pop(row.id, None)
        self.store.update_batch(
            row.id, generated_successes=len(results) - failed, generated_failures=failed
        )

    def finalize_success(self, row: BatchRow, end_time: float) -> None:
        """Publish a generated output: the `files/batch-<id>` file, then the terminal state."""
        settings = self._settings()
        with self._lock:
            fresh = self.store.get_batch(row.id)
            if fresh is None or fresh.final_state is not None:
                return
            output_file = None
            if fresh.source_kind == "file":
                file_id = f"batch-{row.id}"
                blob = self.store.blob_path(file_id)
                done = self._done_path(row.id)
                if done.exists():
                    os.replace(done, blob)
                if self.store.get_file(file_id) is None and blob.exists():
                    self.store.insert_file(
                        FileRow(
                            id=file_id,
                            display_name=file_id,
                            mime_type="application/jsonl",
                            size_bytes=blob.stat().st_size,
                            sha256=None,
                            create_time=end_time,
                            update_time=end_time,
                            expiration_time=end_time + settings.file_ttl_s,
                            source="GENERATED",
                            state="ACTIVE",
                        )
                    )
                output_file = f"files/{file_id}"
            self.store.finalize_batch(
                row.id, final_state="SUCCEEDED", end_time=end_time, output_file=output_file
            )
            self.store.batch_input_path(row.id).unlink(missing_ok=True)

    # -- wire shape --------------------------------------------------------------------
    def operation(self, row: BatchRow, now: float, with_output: bool = True) -> dict[str, Any]:
        view = self.view(row, now)
        if view.state in TERMINAL:
            fresh = self.store.get_batch(row.id)
            row = fresh or row
        name = f"batches/{row.id}"
        stats = {"requestCount": int64(row.request_count)}
        for stat, value in (
            ("successfulRequestCount", view.succeeded),
            ("failedRequestCount", view.failed),
            ("pendingRequestCount", view.pending),
        ):
            if value:  # proto3 JSON omits zeros
                stats[stat] = int64(value)
        metadata: dict[str, Any] = {"@type": BATCH_TYPE, "model": row.model}
        if row.display_name is not None:
            metadata["displayName"] = row.display_name
        if row.source_kind == "file":
            metadata["inputConfig"] = {"fileName": row.input_file}
        update_time = max(row.update_time, _transition_time(row, view, now))
        metadata["createTime"] = _timestamp(row.create_time)
        if view.end_time is not None:
            metadata["endTime"] = _timestamp(view.end_time)
        metadata["updateTime"] = _timestamp(update_time)
        metadata["batchStats"] = stats
        metadata["state"] = f"BATCH_STATE_{view.state}"
        metadata["name"] = name
        if row.priority is not None:
            metadata["priority"] = int64(row.priority)
        operation: dict[str, Any] = {"name": name, "metadata": metadata}
        if view.state in TERMINAL:
            operation["done"] = True
        if view.state == "SUCCEEDED" and with_output:
            output = self._output(row)
            if output is not None:
                metadata["output"] = output
                operation["response"] = {"@type": OUTPUT_TYPE, **output}
        elif view.state == "FAILED":
            operation["error"] = {"code": 13, "message": "Batch processing failed."}
        return operation

    def _output(self, row: BatchRow) -> dict[str, Any] | None:
        if row.source_kind == "file":
            return {"responsesFile": row.output_file} if row.output_file else None
        path = self.store.inline_output_path(row.id)
        if not path.exists():
            return None
        return {"inlinedResponses": {"inlinedResponses": json.loads(path.read_bytes())}}


def _next_instant(row: BatchRow, now: float) -> float:
    """The next instant after `now` at which the batch's clock changes its state; while it
    waits for its output (the clock has run out), soon, until the output is published."""
    pending_end = row.create_time + row.pending_s
    later = [
        t
        for t in (pending_end, pending_end + row.running_s, row.create_time + row.expire_s)
        if t > now
    ]
    return min(later) if later else now + 0.1


def _transition_time(row: BatchRow, view: View, now: float) -> float:
    """`updateTime` moves at each transition and while counts move."""
    if view.end_time is not None:
        return view.end_time
    pending_end = row.create_time + row.pending_s
    if view.state == "RUNNING":
        return min(now, pending_end + row.running_s)
    return row.create_time


def _line_spans(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every non-blank line; `os.pread` on them is thread-safe."""
    spans = []
    position = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                spans.append((position, len(raw)))
            position += len(raw)
    return spans


def _complete_lines(path: Path) -> int:
    """Lines fully written by an earlier run; a torn last line is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data[:end].count(b"\n")


def _count_errors(path: Path) -> int:
    if not path.exists():
        return 0
    count = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if b'"error"' in raw and "error" in json.loads(raw):
                count += 1
    return count


_FLAKY_ERROR = {"code": 13, "message": "Internal error encountered."}


def _key_of(raw: bytes) -> str | None:
    key = json.loads(raw).get("key")
    return key if isinstance(key, str) or key is None else json.dumps(key)


def _answer_line(raw: bytes, model: str, responder: Responder) -> tuple[str | None, Reply]:
    line = json.loads(raw)
    key = line.get("key")
    key = key if isinstance(key, str) else (None if key is None else json.dumps(key))
    request = line.get("request")
    if request is None:
        return key, Reply(error={"code": 3, "message": "request is required."})
    return key, responder.reply(request, model)


def _output_line(key: str | None, reply: Reply, key_first: bool) -> bytes:
    body: dict[str, Any]
    if reply.error is not None:
        body = {"error": reply.error}
    else:
        body = {"response": reply.response}
    if key is not None:
        body = {"key": key, **body} if key_first else {**body, "key": key}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _ordered_map(
    work: Callable[[int], Any], positions: range, concurrency: int, stop: threading.Event
) -> Any:
    """Yield (position, work(position)) in order, computing up to `concurrency` at once."""
    if concurrency <= 1:
        for position in positions:
            if stop.is_set():
                return
            yield position, work(position)
        return
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="emulator-reply") as pool:
        window: list[tuple[int, Any]] = []
        iterator = iter(positions)
        for position in iterator:
            window.append((position, pool.submit(work, position)))
            if len(window) >= concurrency * 2:
                break
        while window:
            if stop.is_set():
                for _, future in window:
                    future.cancel()
                return
            position, future = window.pop(0)
            yield position, future.result()
            nxt = next(iterator, None)
            if nxt is not None:
                window.append((nxt, pool.submit(work, nxt)))
