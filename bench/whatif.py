"""What-if patches: changes to `gembatch serve` measured without editing the service.

Why: a benchmark that misses its target should say what would meet it, with numbers from
the same run. These patches are proposals for code other people own (the SSE hub, the SQL
ledger, the server runner); a bench script applies them to the server processes it starts
with `--patch NAME`: it puts bench/_whatif on their PYTHONPATH, whose sitecustomize calls
`apply()` with the names in $GEMBATCH_BENCH_PATCH before gembatch starts. Nothing else
uses them.
"""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "GEMBATCH_BENCH_PATCH"
SITE_DIR = Path(__file__).resolve().parent / "_whatif"


def environment(names: list[str]) -> dict[str, str]:
    """The environment that makes a Python process apply `names` at start."""
    if not names:
        return {}
    path = os.pathsep.join(filter(None, [str(SITE_DIR), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, ENV: ",".join(names)}


def _asyncio_with(**overrides: Any) -> types.ModuleType:
    """A stand-in for a module's `asyncio` global with some functions replaced."""
    shim = types.ModuleType("asyncio")
    shim.__dict__.update(asyncio.__dict__)
    shim.__dict__.update(overrides)
    return shim


def hub_wake() -> None:
    """SQLite: the hub reads the event log as soon as a write commits in this process,
    instead of up to `event_poll_interval` (0.2 s) later. Proposal: SqlLedger calls an
    `on_commit` hook after a committed write; the app sets the hub's wake-up event from it
    (loop.call_soon_threadsafe); `_tail` waits on (stop, wake-up, interval)."""
    from gembatch.ledger import sql
    from gembatch.server import hub

    hooks: list[Callable[[], None]] = []
    run = sql.SqlLedger._run

    def _run(self: Any, work: Any, *, write: bool) -> Any:
        result = run(self, work, write=write)
        if write and getattr(self._local, "conn", None) is None:  # the outermost one
            for hook in list(hooks):
                hook()
        return result

    async def _tail(self: Any, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        hooks.append(lambda: loop.call_soon_threadsafe(self._wakeup.set))
        self._cursor = await asyncio.to_thread(self.ledger.last_event_id)
        while not stop.is_set():
            self._wakeup.clear()  # before the read: a commit during it wakes us again
            try:
                events = await asyncio.to_thread(self.ledger.events_since, self._cursor, None, 1000)
            except Exception:
                events = []
            for stored in events:
                self._cursor = stored.id
                if stored.job_id in self._subscribers:
                    self.publish(hub.HubEvent(stored.job_id, stored.seq, stored.type, stored.data))
            if len(events) < 1000:
                await hub._wait_any(stop, self._wakeup, self.interval)

    sql.SqlLedger._run = _run  # type: ignore[method-assign]
    hub.EventHub._tail = _tail  # type: ignore[method-assign]


def sse_encode_once() -> None:
    """Each event is serialised once, not once per client: `sse()` returns the encoded
    bytes (sse-starlette sends bytes as they are). Proposal: HubEvent carries its encoded
    form, built once by `publish`."""
    from sse_starlette.event import ServerSentEvent

    from gembatch.server import hub

    original = hub.sse
    cache: dict[tuple[str, int | None, int], tuple[Any, bytes]] = {}

    def sse(event: str, seq: int | None, data: dict[str, Any]) -> Any:
        key = (event, seq, id(data))
        hit = cache.get(key)
        if hit is not None and hit[0] is data:
            return hit[1]
        message = original(event, seq, data)
        encoded = ServerSentEvent(
            data=message["data"], event=message["event"], id=message.get("id"), sep="\r\n"
        ).encode()
        if len(cache) > 256:
            cache.clear()
        cache[key] = (data, encoded)  # `data` kept alive: its id() is not reused meanwhile
        return encoded

    hub.sse = sse


def no_wait_for() -> None:
    """Streams wait for their next event under `asyncio.timeout()` instead of
    `asyncio.wait_for()`, which on Python 3.11 wraps every wait in a new Task."""
    from gembatch.server import hub

    async def wait_for(awaitable: Any, timeout: float | None) -> Any:
        async with asyncio.timeout(timeout):
            return await awaitable

    hub.asyncio = _asyncio_with(wait_for=wait_for)  # type: ignore[attr-defined]


def no_recheck() -> None:
    """No per-stream safety-net re-read of the log (every RECHECK_SECONDS, each stream
    reads its job twice). Proposal: on SQLite too the hub re-reads each subscribed job
    once per interval (as it does on PostgreSQL), not each of its streams."""
    from gembatch.server import hub

    hub.RECHECK_SECONDS = float("inf")


def fast_get() -> None:
    """SqlLedger.get with statements built once (bound by parameters) and the job's
    tasks read only when it has any: no expression building, coercion or cache-key
    computation per call. Proposal for the ledger: the same for its other hot reads, as
    it already does for job row updates."""
    import sqlalchemy as sa

    from gembatch.ledger import sql

    jobs, tasks = sql.m.jobs, sql.m.tasks
    by_id = sa.select(jobs.c.record).where(jobs.c.id == sa.bindparam("job_id"))
    by_user = sa.select(jobs.c.record).where(
        jobs.c.id == sa.bindparam("job_id"), jobs.c.user_id == sa.bindparam("user_id")
    )
    task_query = (
        sa.select(tasks.c.record)
        .where(tasks.c.job_id == sa.bindparam("job_id"))
        .order_by(tasks.c.idx)
    )

    def get(self: Any, job_id: str, user_id: str | None = None) -> Any:
        def work(conn: Any) -> Any:
            if user_id is None:
                record = conn.execute(by_id, {"job_id": job_id}).scalar()
            else:
                params = {"job_id": job_id, "user_id": user_id}
                record = conn.execute(by_user, params).scalar()
            if record is not None and isinstance(record.get("tasks"), list):
                found = [r for (r,) in conn.execute(task_query, {"job_id": job_id})]
                if found:
                    record["tasks"] = found
            return record

        return self._run(work, write=False)

    sql.SqlLedger.get = get  # type: ignore[method-assign]


def inline_get() -> None:
    """The service reads a job on the event loop instead of in a worker thread (one
    indexed SQLite read; no thread hop, no GIL hand-over). Only sound where a read never
    waits: SQLite in WAL mode, not PostgreSQL over a network."""
    from gembatch.jobs import Job
    from gembatch.server import service
    from gembatch.server.service import not_found

    async def job(self: Any, job_id: str, user: str) -> Any:
        record = self.ledger.get(job_id, self._scope(user))
        if record is None:
            raise not_found(job_id)
        return Job.from_record(record)

    service.JobService.job = job  # type: ignore[method-assign]


def uvloop_server() -> None:
    """The server's event loop on uvloop: `gembatch.server.run.serve` calls asyncio.run()
    itself, so uvicorn's `loop="auto"` never installs uvloop (the emulator uses it)."""
    import uvloop

    from gembatch.server import run

    run.asyncio = _asyncio_with(run=uvloop.run)  # type: ignore[attr-defined]


PATCHES: dict[str, Callable[[], None]] = {
    "hub-wake": hub_wake,
    "sse-encode-once": sse_encode_once,
    "no-wait-for": no_wait_for,
    "no-recheck": no_recheck,
    "fast-get": fast_get,
    "inline-get": inline_get,
    "uvloop": uvloop_server,
}


def apply(names: str) -> None:
    for name in filter(None, names.split(",")):
        PATCHES[name]()
