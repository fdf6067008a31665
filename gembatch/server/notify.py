"""Webhook notifications: a JSON POST to the job's `notify_url` (and a service-wide URL)
when a job completes or fails (seed 004's error notification).

Why: a web backend wants to hear when its job ends without holding an SSE stream open for
hours, and a receiver that is down must neither lose the message nor slow the engine. So
notifications are an outbox: the ledger's event log is read from a cursor kept in the
ledger (`meta["notify_cursor"]`), each terminal event becomes one delivery row per URL
(idempotent on event and URL), and a background loop sends due deliveries with timeouts,
retrying with backoff. A restart continues from the cursor: nothing is skipped, and a
delivered row is never sent again. Receivers dedupe on `X-Gembatch-Event-Id`.

Several processes on one PostgreSQL: event ids are taken before commit, so an event can
appear below ids already read. The cursor therefore only moves to a "settled" id: the
highest id visible `settle_seconds` ago (every smaller id was taken before it, and write
transactions are short, so each has committed or rolled back since). Events above it are
read again each round and queued once (the outbox ignores repeats). SQLite writers are
serialised: there the cursor settles at once. Each process queues what it reads, but a
delivery is sent by one process only: it is claimed first (`FOR UPDATE SKIP LOCKED`, its
`next_at` pushed ahead as a lease), so a sender that dies leaves it due after the lease.

Targets are checked before each POST (gembatch.server.webhook_targets): the host is
resolved, every address must be public unless the operator allows private ones, and the
POST connects to a checked address (no redirects followed). A refused target is given up
at once. Only the receiver's status code is kept, never its reply: an internal server
made to answer a webhook must not have its reply shown to whoever chose the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from gembatch import __version__
from gembatch.gemini.errors import scrub
from gembatch.jobs import RetryConfig
from gembatch.ledger import UnstorableRecord
from gembatch.retry import backoff
from gembatch.server.events import COMPLETED, ERROR, TERMINAL_EVENTS
from gembatch.server.views import api_time
from gembatch.server.webhook_targets import Resolver, TargetRefused, addresses_for, safe_url

CURSOR_KEY = "notify_cursor"
ACTOR = "notifier"
GAVE_UP = "notify_failed"
IDLE_SECONDS = 0.5
EVENTS_PER_ROUND = 500  # per read; a round reads up to MAX_PAGES reads
MAX_PAGES = 20
DELIVERIES_PER_ROUND = 100
CLAIMS_PER_SENDER = 4  # deliveries claimed per concurrent sender and round
LEASE_MARGIN = 30.0  # seconds a claim lasts beyond the time its POSTs can take
SETTLE_SECONDS = 30.0  # PostgreSQL: a write transaction ends this soon after taking ids
MAX_ERROR_CHARS = 500
NEVER = math.inf  # `next_at` of a delivery given up on

_log = logging.getLogger(__name__)


class Notifier:
    """Reads terminal events into the delivery outbox and sends what is due."""

    def __init__(
        self,
        ledger: Any,
        *,
        service_url: str | None = None,
        timeout: float = 10.0,
        max_attempts: int = 8,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        clock: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
        concurrency: int = 8,
        settle_seconds: float | None = None,
        allow_private: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.ledger = ledger
        self.service_url = service_url or None
        self.allow_private = allow_private  # --notify-allow-private: loopback, LAN targets
        self._resolver = resolver  # None: the system's; tests swap DNS with it
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_delay = max_delay
        self._backoff = RetryConfig(retry_interval=base_delay, max_interval=max_delay)
        self._clock = clock
        self._client = client
        self._own_client = client is None
        self._concurrency = max(1, concurrency)
        if settle_seconds is None:
            postgres = getattr(ledger, "dialect", None) == "postgresql"
            settle_seconds = SETTLE_SECONDS if postgres else 0.0
        self.settle_seconds = settle_seconds
        # (monotonic time, highest event id visible then): settled `settle_seconds` later.
        self._marks: deque[tuple[float, int]] = deque()
        self._queued: set[int] = set()  # terminal events above the cursor queued already

    # -- the loop ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: queue new terminal events, send due deliveries, rest
        ~0.5 s when there was nothing to do. No error escapes: a broken round is logged
        and the next one tries again."""
        try:
            while not stop.is_set():
                try:
                    busy = await self.run_once()
                except Exception as exc:
                    # The message only (scrubbed): a database error can quote its
                    # parameters, and a notify URL may carry credentials.
                    _log.warning(
                        "notification round failed (%s: %s); retrying shortly",
                        type(exc).__name__,
                        scrub(str(exc))[:MAX_ERROR_CHARS],
                    )
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), IDLE_SECONDS)
        finally:
            await self.aclose()

    async def run_once(self) -> bool:
        """One round: queue terminal events since the cursor, then send due deliveries.
        True when a batch was full (more work is waiting)."""
        queued_full = await self.queue_events()
        sent_full = await self.send_due()
        return queued_full or sent_full

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- events -> deliveries ----------------------------------------------------------
    async def queue_events(self) -> bool:
        """One delivery per (terminal event, URL) for events above the cursor; then move
        the cursor to the settled id. A crash between the two re-queues the same rows,
        which the ledger ignores. True when more events wait than one round reads."""
        cursor = await _thread(self._read_cursor)
        high = await _thread(self.ledger.last_event_id)
        if not self._marks or high > self._marks[-1][1]:
            self._marks.append((time.monotonic(), high))
        after, complete = cursor, False
        for _ in range(MAX_PAGES):
            events = await _thread(
                self.ledger.events_since, after, types=sorted(TERMINAL_EVENTS),
                limit=EVENTS_PER_ROUND,
            )  # fmt: skip
            fresh = [event for event in events if event.id not in self._queued]
            if fresh:
                await _thread(self._queue, fresh)
                self._queued.update(event.id for event in fresh)
            if len(events) < EVENTS_PER_ROUND:
                complete = True
                break
            after = events[-1].id
        settled = self._settled()
        if not complete:
            settled = min(settled, after)
        # Another process may have moved the cursor meanwhile: never move it back.
        if settled > cursor and settled > await _thread(self._read_cursor):
            await _thread(self.ledger.meta_set, CURSOR_KEY, str(settled))
        self._queued = {event_id for event_id in self._queued if event_id > settled}
        return not complete

    def _settled(self) -> int:
        """The highest id of the log below which no event can still appear (0: none)."""
        settled = 0
        horizon = time.monotonic() - self.settle_seconds
        while self._marks and self._marks[0][0] <= horizon:
            settled = self._marks.popleft()[1]
        return settled

    def _read_cursor(self) -> int:
        text = self.ledger.meta_get(CURSOR_KEY)
        try:
            return int(text) if text else 0
        except ValueError:
            _log.warning("ignoring a malformed %s %r; starting from 0", CURSOR_KEY, text)
            return 0

    def _queue(self, events: list[Any]) -> None:
        for event in events:
            if not _notifiable(event):
                continue
            record = self.ledger.get(event.job_id)
            urls = [(record or {}).get("notify_url"), self.service_url]
            payload = {"event": event.type, "event_id": event.id, "job": event.data}
            for url in dict.fromkeys(u for u in urls if u):
                if not _is_http_url(url):
                    _log.warning("not notifying %s: not an http(s) URL", safe_url(url))
                    continue
                try:
                    self.ledger.enqueue_delivery(
                        event.id, event.job_id, url, payload, next_at=self._clock()
                    )
                except UnstorableRecord as exc:  # this row only: the others still go out
                    _log.warning("not notifying %s: %s", safe_url(url), exc)

    # -- sending -----------------------------------------------------------------------
    async def send_due(self) -> bool:
        """Claim due deliveries and POST them (bounded concurrency); True when the batch
        was full. The claim's lease outlasts every POST of the batch, so no other process
        sends them meanwhile."""
        limit = min(DELIVERIES_PER_ROUND, CLAIMS_PER_SENDER * self._concurrency)
        lease = math.ceil(limit / self._concurrency) * (self.timeout + 1.0) + LEASE_MARGIN
        due = await _thread(self.ledger.claim_due_deliveries, self._clock(), lease, limit)
        if not due:
            return False
        gate = asyncio.Semaphore(self._concurrency)

        async def one(delivery: Any) -> None:
            async with gate:
                await self._deliver(delivery)

        await asyncio.gather(*(one(d) for d in due))
        return len(due) >= limit

    async def _deliver(self, delivery: Any) -> None:
        error, final = await self._post(delivery)
        now = self._clock()
        if error is None:
            await _thread(self.ledger.mark_delivered, delivery.event_id, delivery.url, now)
            return
        attempts = int(delivery.attempts or 0) + 1
        if final or attempts >= self.max_attempts:
            # Given up: next attempt "never" (never due again); the row keeps its attempts
            # and last error for operators, and the audit log says so.
            await _thread(self.ledger.mark_failed, delivery.event_id, delivery.url, error, NEVER)
            detail = {
                "event_id": delivery.event_id,
                "url": safe_url(delivery.url),
                "attempts": attempts,
                "error": error,
            }
            await _thread(self.ledger.audit, ACTOR, GAVE_UP, delivery.job_id, detail)
            _log.warning(
                "gave up notifying %s of event %s after %d attempts: %s",
                safe_url(delivery.url),
                delivery.event_id,
                attempts,
                error,
            )
            return
        delay = min(self.max_delay, backoff(self._backoff, attempts))
        await _thread(self.ledger.mark_failed, delivery.event_id, delivery.url, error, now + delay)

    async def _post(self, delivery: Any) -> tuple[str | None, bool]:
        """POST one delivery: (None, _) when the receiver answered 2xx, else (what went
        wrong, with no userinfo or query string of the URL in it; whether that is final).
        The receiver's reply body is never read into either."""
        try:
            addresses = await asyncio.wait_for(
                addresses_for(
                    delivery.url, allow_private=self.allow_private, resolver=self._resolver
                ),
                self.timeout,
            )
        except TargetRefused as exc:
            return _clean(f"refused: {exc}", delivery.url), True
        except (OSError, TimeoutError) as exc:
            return _clean(f"cannot resolve the host name: {exc}", delivery.url), False
        body = dict(delivery.payload)
        body["sent_at"] = api_time(self._clock())
        url = httpx.URL(delivery.url)
        headers = {
            "Host": url.netloc.decode("ascii"),  # the name, though we connect to an address
            "Content-Type": "application/json",
            "User-Agent": f"gembatch/{__version__}",
            "X-Gembatch-Event-Id": str(delivery.event_id),
        }
        # TLS checks the certificate against the name too, not the address.
        extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
        error = "no address"
        for address in addresses:  # each one checked above: never a name resolved again
            try:
                response = await asyncio.wait_for(
                    self._http().post(
                        url.copy_with(host=str(address)), json=body, headers=headers,
                        extensions=extensions,
                    ),
                    self.timeout + 1.0,  # the client's own timeout should fire first
                )  # fmt: skip
            except httpx.ConnectError as exc:  # this address is down: the next one may not be
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return _clean(error, delivery.url), False
            if 200 <= response.status_code < 300:
                return None, False
            return _clean(f"HTTP {response.status_code}", delivery.url), False
        return _clean(error, delivery.url), False

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=False,  # a redirect could lead anywhere, unchecked
                trust_env=False,  # a proxy would connect to a name it resolves itself
                # One connection per POST: a pooled one is keyed by address, and was
                # opened (TLS included) for whichever name came first.
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._client


def _clean(message: str, url: str) -> str:
    message = message.replace(url, safe_url(url))
    parts = urlsplit(url)
    if parts.password:
        message = message.replace(parts.password, "***")
    return scrub(message)[:MAX_ERROR_CHARS]


def _notifiable(event: Any) -> bool:
    if event.type == COMPLETED:
        return True
    # A deletion is not a job finishing.
    return event.type == ERROR and (event.data or {}).get("code") != "DELETED"


def _is_http_url(url: Any) -> bool:
    if not isinstance(url, str) or any(c <= " " or c == "\x7f" for c in url):
        return False  # a control character (NUL, ...) or a space: not a URL to send to
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


async def _thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Ledger calls block (SQL, file locks): run them off the event loop, so the engine
    and the HTTP handlers sharing the loop never wait on the notifier."""
    return await asyncio.to_thread(function, *args, **kwargs)
