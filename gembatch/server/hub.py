"""Server-Sent Events: one reader of the event log per process, fanned out to clients.

Why: a browser that drops and reconnects with `Last-Event-ID` must get exactly the events
it missed, and a thousand browsers on one job must not mean a thousand database queries.
Events live in the ledger's per-job log (written with the change that caused them); this
hub reads new ones once per process and hands them to every subscriber of that job. A
stream subscribes before it replays from the log, so nothing falls between replay and
tail, and de-duplicates by `seq`.

On SQLite (one process, serialised writers) the hub tails the whole log by its global id.
On PostgreSQL other processes write too, and ids become visible out of order, so the hub
reads per job by the gap-free `seq` instead: a LISTEN connection hears `<job> <seq>` at
every commit, and the hub reads `events_after(job, last seq published)` for the jobs it
has subscribers for. NOTIFY has no replay, so every subscribed job is also re-read
periodically and after each reconnect of the LISTEN connection (a lost notification or a
silent, half-open connection then costs latency, never an event).

Commits made by this process wake the hub at once (`local_commit`, called by the ledger
after each commit that wrote events or deleted jobs), so an event leaves for its streams
within milliseconds; the interval and the re-query are only the safety net. Each event is
encoded once, whatever the number of its streams, and a stream is a wait on its queue:
1,000 browsers on one job cost one read of the log per event, not 1,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette.event import ServerSentEvent

from gembatch.aio import wait_any
from gembatch.gemini.errors import scrub
from gembatch.jobs import Job
from gembatch.server.events import ERROR, STATUS, TERMINAL_EVENTS
from gembatch.server.views import job_status

_log = logging.getLogger(__name__)
QUEUE_SIZE = 1000
REQUERY_SECONDS = 5.0  # safety net: re-read (PostgreSQL) or re-check (SQLite) followed jobs
LISTEN_CHECK_SECONDS = 15.0  # PostgreSQL: prove the LISTEN connection alive this often
LISTEN_BACKOFF = (0.5, 30.0)  # reconnect delays: first, largest (doubling, with jitter)
LISTEN_APPLICATION = "gembatch-listen"  # application_name, then `-<pid>`
PAGE = 1000  # events per read
SEPARATOR = "\r\n"  # sse-starlette's own


class HubEvent:
    """An event of a job's log as streams send it; `encoded` (the SSE bytes) is built once
    for all its subscribers."""

    __slots__ = ("_encoded", "data", "deleted", "job_id", "seq", "type")

    def __init__(
        self, job_id: str, seq: int, type: str, data: dict[str, Any], deleted: bool = False
    ) -> None:
        self.job_id = job_id
        self.seq = seq
        self.type = type
        self.data = data
        self.deleted = deleted  # the job is gone (its log with it): the stream ends
        self._encoded: bytes | None = None

    @property
    def encoded(self) -> bytes:
        if self._encoded is None:
            self._encoded = sse(self.type, self.seq, self.data)
        return self._encoded

    def __repr__(self) -> str:
        return f"HubEvent({self.job_id!r}, {self.seq}, {self.type!r}, deleted={self.deleted})"


class EventHub:
    """New events of the log, read once per process and handed to each subscriber.

    `interval`: how often the whole log is tailed (SQLite). On PostgreSQL (the ledger has
    a `notify_channel`): `requery_interval` is how often every subscribed job is re-read
    without a notification, `listen_check` how often the LISTEN connection must answer a
    query, and `listen_url` where it connects (default: the ledger's database).
    """

    def __init__(
        self,
        ledger: Any,
        interval: float = 0.2,
        *,
        requery_interval: float = REQUERY_SECONDS,
        listen_check: float = LISTEN_CHECK_SECONDS,
        listen_url: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.interval = interval
        self.requery_interval = requery_interval
        self.listen_check = listen_check
        self._subscribers: dict[str, set[asyncio.Queue[HubEvent | None]]] = {}
        self._cursor: int | None = None
        self.channel: str | None = getattr(ledger, "notify_channel", None)
        self._listen_url = listen_url or (_conninfo(ledger.url) if self.channel else "")
        # PostgreSQL: per subscribed job, the last seq published (None: not read yet).
        self._published: dict[str, int | None] = {}
        self._due: set[str] = set()  # jobs to read now
        self._gone: set[str] = set()  # jobs a notification said were deleted
        self._check_all = False  # re-read every subscribed job, checking it still exists
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.listening = False
        self.listen_losses = 0  # LISTEN connections lost (or never opened)
        self.listen_opens = 0
        self.last_listen_error: str | None = None

    @property
    def per_job(self) -> bool:
        """True on PostgreSQL: the hub itself re-reads each subscribed job's log and
        announces deletions, so streams need no re-check of their own."""
        return self.channel is not None

    def subscribe(self, job_id: str) -> asyncio.Queue[HubEvent | None]:
        queue: asyncio.Queue[HubEvent | None] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.setdefault(job_id, set()).add(queue)
        if self.per_job and job_id not in self._published:
            self._published[job_id] = None
            self._due.add(job_id)
            self._wakeup.set()
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[HubEvent | None]) -> None:
        queues = self._subscribers.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                self._subscribers.pop(job_id, None)
                self._published.pop(job_id, None)
                self._due.discard(job_id)

    @property
    def subscribers(self) -> int:
        return sum(len(q) for q in self._subscribers.values())

    def health(self) -> dict[str, Any]:
        """For /healthz: how events reach this process."""
        if not self.per_job:
            return {"mode": "tail", "interval": self.interval, "subscribers": self.subscribers}
        return {
            "mode": "listen",
            "listening": self.listening,
            "listen_opens": self.listen_opens,
            "listen_losses": self.listen_losses,
            "last_listen_error": self.last_listen_error,
            "requery_interval": self.requery_interval,
            "subscribed_jobs": len(self._subscribers),
            "subscribers": self.subscribers,
        }

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
        """Read new events and publish them, until `stop`."""
        self._loop = asyncio.get_running_loop()
        try:
            if self.per_job:
                await self._run_per_job(stop)
            else:
                await self._tail(stop)
        finally:
            self._loop = None

    def local_commit(self, notes: dict[str, int]) -> None:
        """The ledger committed, in this process, new events (`job id -> last seq`) or
        deletions (`job id -> -1`). Called from whatever thread committed."""
        loop = self._loop
        if loop is None or not any(job_id in self._subscribers for job_id in notes):
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._heard_locally, notes)

    def _heard_locally(self, notes: dict[str, int]) -> None:
        for job_id, seq in notes.items():
            if self.per_job:
                self.heard(f"{job_id} {'deleted' if seq < 0 else seq}")
            elif seq < 0 and job_id in self._subscribers:
                self._gone.add(job_id)
        self._wakeup.set()

    # -- SQLite: tail the whole log by id ----------------------------------------------------
    async def _tail(self, stop: asyncio.Event) -> None:
        """One server per SQLite database, and its writers are serialised: ids commit in
        order, so a cursor on the id misses nothing. Deletions leave no event: this
        process's own are heard at commit; every `requery_interval` the subscribed jobs
        are checked to still exist (a safety net, one query for all of them)."""
        self._cursor = await asyncio.to_thread(self.ledger.last_event_id)
        next_check = time.monotonic() + self.requery_interval
        while not stop.is_set():
            self._wakeup.clear()  # before the read: a commit during it wakes us again
            gone, self._gone = self._gone, set()
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.requery_interval
                    followed = list(self._subscribers)
                    if followed:
                        present = await asyncio.to_thread(self.ledger.present_ids, followed)
                        gone.update(j for j in followed if j not in present)
                events = await asyncio.to_thread(self.ledger.events_since, self._cursor, None, PAGE)
            except Exception:
                _log.exception("reading the event log failed; retrying")
                events = []
            for stored in events:
                self._cursor = stored.id
                if stored.job_id in self._subscribers:
                    self.publish(HubEvent(stored.job_id, stored.seq, stored.type, stored.data))
            for job_id in gone:  # after its last events: a stream gets those first
                if job_id in self._subscribers:
                    self._publish_deleted(job_id)
            if len(events) < PAGE:
                wait = min(self.interval, max(0.0, next_check - time.monotonic()))
                await wait_any(stop, self._wakeup, timeout=wait)

    # -- PostgreSQL: LISTEN, read per job by seq, re-query as a safety net -------------------
    async def _run_per_job(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop), name="gembatch-listen")
        try:
            await self._dispatch(stop)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def heard(self, payload: str) -> None:
        """A notification `<job id> <last seq>` or `<job id> deleted`: read that job's
        log if someone here follows it and it has news."""
        job_id, _, what = payload.partition(" ")
        if job_id not in self._subscribers:
            return
        if what == "deleted":
            self._gone.add(job_id)
        else:
            try:
                seq = int(what)
            except ValueError:
                return
            published = self._published.get(job_id)
            if published is not None and seq <= published:
                return  # a re-query got there first
            self._due.add(job_id)
        self._wakeup.set()

    def requery(self) -> None:
        """Re-read every subscribed job at once (as the periodic re-query does)."""
        self._check_all = True
        self._wakeup.set()

    async def _dispatch(self, stop: asyncio.Event) -> None:
        """The only task that reads logs and moves `_published`: one job is never read
        twice at once, so an event is published once, in seq order."""
        next_requery = time.monotonic() + self.requery_interval
        while not stop.is_set():
            await wait_any(stop, self._wakeup, timeout=max(0.0, next_requery - time.monotonic()))
            self._wakeup.clear()
            check: set[str] = set()
            if self._check_all or time.monotonic() >= next_requery:
                check = set(self._subscribers)  # new events, and whether the job still exists
                self._check_all = False
                next_requery = time.monotonic() + self.requery_interval
            gone, self._gone = self._gone, set()
            for job_id in gone:
                self._publish_deleted(job_id)
            due, self._due = (self._due | check) - gone, set()
            plan = [(j, self._published.get(j), j in check) for j in due if j in self._subscribers]
            if not plan:
                continue
            try:
                results = await asyncio.to_thread(self._read, plan)
            except Exception as exc:  # the next re-query tries again
                _log.warning("reading job events failed (%s); retrying", _describe(exc))
                continue
            for job_id, (deleted, events) in results.items():
                if job_id not in self._subscribers:
                    continue  # unsubscribed meanwhile
                if deleted:
                    self._publish_deleted(job_id)
                    continue
                published = self._published.get(job_id)
                for stored in events:
                    if published is None or stored.seq > published:
                        self.publish(HubEvent(job_id, stored.seq, stored.type, stored.data))
                        published = stored.seq
                if published is not None and job_id in self._subscribers:
                    self._published[job_id] = published

    def _read(self, plan: list[tuple[str, int | None, bool]]) -> dict[str, tuple[bool, list[Any]]]:
        """Per job: (deleted, its events after `after`). A job never read (`after` None)
        starts at its latest event: a stream that subscribed and then replayed the log
        has everything before it, and receiving the latest tells it to fill any gap."""
        results: dict[str, tuple[bool, list[Any]]] = {}
        for job_id, after, check in plan:
            if after is None or check:
                last = self.ledger.last_seq(job_id)
                if last is None:
                    results[job_id] = (True, [])
                    continue
                if after is None:
                    after = max(0, last - 1)
                elif last <= after:
                    results[job_id] = (False, [])
                    continue
            events: list[Any] = []
            while True:
                page = self.ledger.events_after(job_id, after, PAGE)
                events.extend(page)
                if len(page) < PAGE:
                    break
                after = page[-1].seq
            results[job_id] = (False, events)
        return results

    def _publish_deleted(self, job_id: str) -> None:
        seq = (self._published.get(job_id) or 0) + 1
        self.publish(HubEvent(job_id, seq, ERROR, _deleted(job_id), deleted=True))

    async def _listen(self, stop: asyncio.Event) -> None:
        """Keep a LISTEN connection open; re-open it (with backoff) whenever it fails or
        stops answering, and re-read every subscribed job after each (re)open."""
        import psycopg
        from psycopg import sql

        assert self.channel is not None
        statement = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        failures = 0
        while not stop.is_set():
            conn: Any = None
            try:
                conn = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self._listen_url,
                        autocommit=True,
                        application_name=f"{LISTEN_APPLICATION}-{os.getpid()}",
                        connect_timeout=max(2, int(self.listen_check)),
                    ),
                    self.listen_check + 5,
                )
                await asyncio.wait_for(conn.execute(statement), self.listen_check)
                self.listening = True
                self.listen_opens += 1
                if failures:
                    _log.warning(
                        "LISTEN connection to PostgreSQL re-opened (channel %s); re-reading "
                        "%d subscribed job(s)",
                        self.channel,
                        len(self._subscribers),
                    )
                failures = 0
                self.requery()  # NOTIFY has no replay: catch up on what nobody heard
                while not stop.is_set():
                    async for notify in conn.notifies(timeout=self.listen_check):
                        self.heard(notify.payload)
                    # Quiet for a while: prove the connection alive (a half-open one
                    # would stay quiet for ever).
                    await asyncio.wait_for(conn.execute("SELECT 1"), self.listen_check)
            except Exception as exc:
                failures += 1
                self.listen_losses += 1
                self.last_listen_error = _describe(exc)
                first, largest = LISTEN_BACKOFF
                delay = min(largest, first * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)
                _log.warning(
                    "LISTEN connection to PostgreSQL %s (%s); events still arrive by "
                    "re-query every %g s; reconnecting in %.1f s",
                    "lost" if self.listening else "failed",
                    self.last_listen_error,
                    self.requery_interval,
                    delay,
                )
                self.listening = False
                self.requery()
                await wait_any(stop, timeout=delay)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)


def sse(event: str, seq: int | None, data: dict[str, Any]) -> bytes:
    """One SSE message, encoded (sse-starlette sends bytes as they are)."""
    return ServerSentEvent(
        data=json.dumps(data, ensure_ascii=False),
        event=event,
        id=None if seq is None else str(seq),
        sep=SEPARATOR,
    ).encode()


async def stream_job(
    hub: EventHub,
    job_id: str,
    user_id: str | None,
    last_event_id: int | None,
    ping_interval: float,
) -> AsyncIterator[bytes]:
    """The events of one job: the missed ones (with Last-Event-ID) or a `status` snapshot,
    then every new one as it is written; `ping` when idle; ends after `completed`/`error`,
    and at once when a resumed stream's job has ended with nothing left to send.

    A client that goes away ends the stream from outside (sse-starlette cancels it), so
    the wait here is only for the next event or the next ping."""
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
            record = await asyncio.to_thread(ledger.get, job_id, user_id)
            if record is None:
                yield sse(ERROR, sent + 1, _deleted(job_id))
                return
            if Job.from_record(record).status.terminal:
                return  # it ended before `sent`: nothing more will come
        else:
            record = await asyncio.to_thread(ledger.get, job_id, user_id)
            if record is None:
                yield sse(ERROR, 1, _deleted(job_id))
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
        while True:
            idle = ping_interval - (time.monotonic() - last_sent_at)
            try:
                async with asyncio.timeout(max(0.0, idle)):
                    event = await queue.get()
            except TimeoutError:
                yield sse("ping", sent, {"time": time.time()})
                last_sent_at = time.monotonic()
                continue
            if event is None:
                return  # closed for being too slow: the client reconnects and replays
            if event.deleted:
                yield sse(ERROR, sent + 1, _deleted(job_id))
                return
            if event.seq <= sent:
                continue  # already sent (replay and tail overlap)
            if event.seq > sent + 1:
                # A gap (the hub started reading this job after our replay): fill it
                # from the log, in order.
                for stored in await asyncio.to_thread(ledger.events_after, job_id, sent):
                    yield sse(stored.type, stored.seq, stored.data)
                    sent = stored.seq
                    if stored.type in TERMINAL_EVENTS:
                        return
                last_sent_at = time.monotonic()
                if event.seq <= sent:
                    continue
                # The log no longer has it (the job was just deleted): send what we have.
            yield event.encoded
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


def _conninfo(url: Any) -> str:
    """The ledger's SQLAlchemy URL (`postgresql+psycopg://...`) as a libpq URI for psycopg,
    query parameters (such as `options=-csearch_path=...`) kept."""
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]
