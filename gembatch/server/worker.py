"""The engine inside the service: a loop of cycles, woken early by new work.

Why: `gembatch serve` runs the same engine as `gembatch poll`, as a background task of
the web process: one cycle every poll interval (or sooner when a retry falls due, or
when a job is created, cancelled or deleted). A failing cycle is logged and retried;
it never takes the web process down. Uploads and creates run beside the cycles, not
inside them: one slow create (Gemini can take seconds to answer) must not stop every
other job's polling, downloads and new submissions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gembatch.aio import wait_any
from gembatch.engine.engine import CycleReport, Engine

_log = logging.getLogger(__name__)
# Start rounds in flight at once; each claims only what the limits leave free.
MAX_START_ROUNDS = 4


class ServiceWorker:
    def __init__(self, engine: Engine, service: Any, poll_interval: float) -> None:
        self.engine = engine
        self.service = service
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self.running = False
        self.cycles = 0
        self.last_cycle_at: float | None = None
        self.last_error: str | None = None
        self.last_report: CycleReport | None = None
        self._starts: set[asyncio.Task[None]] = set()
        self._gate: asyncio.Semaphore | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        self.running = True
        failures = 0
        beats = None
        if self.engine.settings.lease_seconds:
            beats = asyncio.create_task(self._heartbeats(stop), name="gembatch-heartbeat")
        try:
            while not stop.is_set():
                self._wake.clear()
                delay = self.poll_interval
                try:
                    report = await self.engine.cycle(start=False)
                    self._start_round()
                    await self.service.delete_cancelled()
                    self.last_report = report
                    self.last_error = None
                    failures = 0
                    if report.errors:
                        for job_id, message in report.errors[:20]:
                            _log.warning("job %s: %s", job_id, message)
                    if report.next_due is not None:
                        delay = min(delay, max(0.05, report.next_due - time.time()))
                except Exception as exc:  # keep serving; try again with backoff
                    failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    _log.exception("engine cycle failed")
                    delay = min(self.poll_interval, 0.5 * 2 ** min(failures, 6))
                self.cycles += 1
                self.last_cycle_at = time.time()
                await wait_any(stop, self._wake, timeout=delay)
        finally:
            self.running = False
            if beats is not None:
                beats.cancel()
            for task in list(self._starts):
                task.cancel()  # a create cut short is reconciled by display name
            await asyncio.gather(*self._starts, return_exceptions=True)

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        """Renew the leases of claims in progress, three times per lease."""
        period = max(0.05, (self.engine.settings.lease_seconds or 30.0) / 3)
        while not stop.is_set():
            try:
                await self.engine.heartbeat()
            except Exception:  # the next beat tries again; the lease has slack for it
                _log.exception("renewing leases failed")
            await wait_any(stop, timeout=period)

    def _start_round(self) -> None:
        """Upload and create what the limits allow, in the background."""
        if len(self._starts) >= MAX_START_ROUNDS:
            return
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.engine.settings.upload_concurrency)
        task = asyncio.create_task(self._start(self._gate), name="gembatch-start")
        self._starts.add(task)
        task.add_done_callback(self._starts.discard)

    async def _start(self, gate: asyncio.Semaphore) -> None:
        try:
            outcomes = await self.engine.start(gate=gate)
        except Exception:  # the next round tries again
            _log.exception("starting batches failed")
            return
        for outcome in outcomes:
            if not outcome.ok:
                _log.warning("job %s: %s", outcome.job_id, outcome.message)
        if outcomes:
            self.wake()  # poll the new batches, and start more if room is left

    def health(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "cycles": self.cycles,
            "last_cycle_at": self.last_cycle_at,
            "last_error": self.last_error,
        }
