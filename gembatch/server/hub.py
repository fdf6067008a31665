"""Server-Sent Events: one reader of the event log per process, fanned out to clients.

Why: a browser that drops and reconnects with `Last-Event-ID` must get exactly the events
it missed, and a thousand browsers on one job must not mean a thousand database queries.
Events live in the ledger's per-job log (written with the change that caused them); this
hub reads new ones once per process and hands them to every subscriber of that job. A
stream subscribes before it replays from the log, so nothing falls between replay and
tail, and de-duplicates by `seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gembatch.jobs import Job
from gembatch.server.events import ERROR, STATUS, TERMINAL_EVENTS
from gembatch.server.views import job_status

_log = logging.getLogger(__name__)
QUEUE_SIZE = 1000
RECHECK_SECONDS = 5.0  # safety net: re-read the job's log even without a wake-up


@dataclass(frozen=True)
class HubEvent:
    job_id: str
    seq: int
    type: str
    data: dict[str, Any]


class EventHub:
    def __init__(self, ledger: Any, interval: float = 0.2) -> None:
        self.ledger = ledger
        self.interval = interval
        self._subscribers: dict[str, set[asyncio.Queue[HubEvent | None]]] = {}
        self._cursor: int | None = None

    def subscribe(self, job_id: str) -> asyncio.Queue[HubEvent | None]:
        queue: asyncio.Queue[HubEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[HubEvent | None]) -> None:
        queues = self._subscribers.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                self._subscribers.pop(job_id, None)

    @property
    def subscribers(self) -> int:
        return sum(len(q) for q in self._subscribers.values())

    def publish(self, event: HubEvent) -> None:
        """Hand an event to every subscriber of its job. A subscriber too slow to keep up
        is closed (None): its client reconnects with Last-Event-ID and replays the log."""
        for queue in list(self._subscribers.get(event.job_id, ())):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.unsubscribe(event.job_id, queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)

    async def run(self, stop: asyncio.Event) -> None:
        """Read new events from the log and publish them, until `stop`."""
        self._cursor = await asyncio.to_thread(self.ledger.last_event_id)
        while not stop.is_set():
            try:
                events = await asyncio.to_thread(self.ledger.events_since, self._cursor, None, 1000)
            except Exception:
                _log.exception("reading the event log failed; retrying")
                events = []
            for stored in events:
                self._cursor = stored.id
                if stored.job_id in self._subscribers:
                    self.publish(HubEvent(stored.job_id, stored.seq, stored.type, stored.data))
            if len(events) < 1000:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)


def sse(event: str, seq: int | None, data: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"event": event, "data": json.dumps(data, ensure_ascii=False)}
    if seq is not None:
        message["id"] = str(seq)
    return message


async def stream_job(
    hub: EventHub,
    job_id: str,
    user_id: str | None,
    last_event_id: int | None,
    ping_interval: float,
    is_disconnected: Callable[[], Any],
) -> AsyncIterator[dict[str, Any]]:
    """The events of one job: the missed ones (with Last-Event-ID) or a `status` snapshot,
    then every new one as it is written; `ping` when idle; ends after `completed`/`error`."""
    ledger = hub.ledger
    queue = hub.subscribe(job_id)
    try:
        sent = 0
        if last_event_id is not None:
            sent = last_event_id
            for stored in await asyncio.to_thread(ledger.events_after, job_id, sent):
                yield sse(stored.type, stored.seq, stored.data)
                sent = stored.seq
                if stored.type in TERMINAL_EVENTS:
                    return
        else:
            record = await asyncio.to_thread(ledger.get, job_id, user_id)
            if record is None:
                yield sse(ERROR, None, _deleted(job_id))
                return
            job = Job.from_record(record)
            sent = await asyncio.to_thread(ledger.last_seq, job_id) or 0
            yield sse(STATUS, sent, job_status(job))
            if job.status.terminal:
                terminal = await _last_terminal(ledger, job_id, sent)
                if terminal is not None:
                    yield sse(terminal.type, terminal.seq, terminal.data)
                return
        last_sent_at = time.monotonic()
        last_check = time.monotonic()
        while True:
            timeout = min(1.0, ping_interval)
            try:
                event = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                event = None
                if await is_disconnected():
                    return
                now = time.monotonic()
                if now - last_check >= RECHECK_SECONDS:
                    last_check = now
                    if await asyncio.to_thread(ledger.last_seq, job_id) is None:
                        yield sse(ERROR, sent + 1, _deleted(job_id))
                        return
                    for stored in await asyncio.to_thread(ledger.events_after, job_id, sent):
                        yield sse(stored.type, stored.seq, stored.data)
                        sent = stored.seq
                        last_sent_at = now
                        if stored.type in TERMINAL_EVENTS:
                            return
                if now - last_sent_at >= ping_interval:
                    yield sse("ping", sent, {"time": time.time()})
                    last_sent_at = now
                continue
            if event is None and queue.empty():
                return  # closed for being too slow: the client reconnects and replays
            if event is None:
                continue
            if event.seq <= sent:
                continue  # already sent (replay and tail overlap)
            if event.seq > sent + 1 and event.type != ERROR:
                # A gap (e.g. the hub skipped ahead): fill it from the log, in order.
                for stored in await asyncio.to_thread(ledger.events_after, job_id, sent):
                    yield sse(stored.type, stored.seq, stored.data)
                    sent = stored.seq
                    if stored.type in TERMINAL_EVENTS:
                        return
                last_sent_at = time.monotonic()
                continue
            yield sse(event.type, event.seq, event.data)
            sent = event.seq
            last_sent_at = time.monotonic()
            if event.type in TERMINAL_EVENTS:
                return
    finally:
        hub.unsubscribe(job_id, queue)


async def _last_terminal(ledger: Any, job_id: str, last: int) -> Any:
    for stored in reversed(await asyncio.to_thread(ledger.events_after, job_id, max(0, last - 10))):
        if stored.type in TERMINAL_EVENTS:
            return stored
    return None


def _deleted(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": "failed", "error": "deleted", "code": "DELETED",
            "message": "job deleted"}  # fmt: skip
