"""Several `gembatch serve` processes on one PostgreSQL: SSE and webhooks across processes.

Real service processes on a real emulator and a real PostgreSQL (each test in a schema of
its own; skipped, saying why, when no server is reachable). A client following a job on
one process gets every event another process wrote, through LISTEN/NOTIFY and, when
notifications are lost (the LISTEN connection killed or silently cut), through the
hub's re-query; two processes notify each finished job exactly once. The in-process tests
below drive the hub, the notifier and the delivery claims against the same database.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from httpx_sse import ServerSentEvent

from gembatch.ledger.sql import SqlLedger
from gembatch.server.events import TERMINAL_EVENTS, events_for
from gembatch.server.hub import EventHub, HubEvent
from gembatch.server.notify import CURSOR_KEY, Notifier
from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    create_job,
    eventually,
    inline_body,
    wait_status,
)
from tests.server.reliability_helpers import WebhookReceiver, wait_all
from tests.server.test_notify import TO_COMPLETED, advance, closed_port_url, new_record
from tests.server.test_sse import as_log, assert_ids, data, log_after, not_pings, read_stream

# Test functions take `postgresql_url` before `service_factory`: fixtures are torn down in
# reverse order, so the services stop before their schema is dropped.

# Long enough RUNNING for progress events to be written while a client follows the job.
MOVING = {"clock": {"pending_seconds": 0.5, "running_seconds": 3.0}}
SLOW = {"clock": {"pending_seconds": 0.5, "running_seconds": 6.0}}
HELD = {"clock": {"pending_seconds": 30.0, "running_seconds": 1.0}}  # PENDING remotely


def pair(launcher: ServiceLauncher, db_url: str, config: dict[str, Any], *args: str) -> Any:
    """Two services on one emulator, one PostgreSQL database and one data directory (the
    records name files relative to it: each server finds them in its own mount)."""
    emu = launcher.emulator(config)
    shared = ("--data-dir", str(launcher.root / "shared-data"), *args)
    first = launcher(emulator=emu, db_url=db_url, args=shared)
    second = launcher(emulator=emu, db_url=db_url, args=shared)
    return first, second


def psycopg_url(db_url: str) -> str:
    return db_url.replace("postgresql+psycopg://", "postgresql://")


def listen_backends(db_url: str, svc: ServiceProcess) -> list[int]:
    """The backend pids of `svc`'s LISTEN connection(s) (named after its process id)."""
    assert svc.proc is not None
    with psycopg.connect(psycopg_url(db_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"gembatch-listen-{svc.proc.pid}",),
        ).fetchall()
    return [row[0] for row in rows]


def terminate(db_url: str, pids: list[int]) -> None:
    with psycopg.connect(psycopg_url(db_url), autocommit=True) as conn:
        for pid in pids:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def consecutive(events: list[ServerSentEvent]) -> bool:
    ids = [int(e.id) for e in events]
    return ids == list(range(ids[0], ids[0] + len(ids)))


class StreamReader:
    """Reads one SSE stream in a thread (the test meanwhile acts on the service)."""

    def __init__(self, svc: ServiceProcess, job_id: str) -> None:
        self.events: list[ServerSentEvent] = []
        self.closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(svc, job_id), daemon=True)
        self._thread.start()

    def _run(self, svc: ServiceProcess, job_id: str) -> None:
        try:
            with svc.client(timeout=60) as client:
                self.events, self.closed = read_stream(
                    client, "GET", f"/api/job/{job_id}/stream", stop=self._seen, timeout=120
                )
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _seen(self, events: list[ServerSentEvent]) -> bool:
        self.events = events  # the list read_stream fills: visible while it runs
        return False

    def join(self) -> list[ServerSentEvent]:
        self._thread.join(150)
        assert not self._thread.is_alive(), "the stream did not end"
        if self.error is not None:
            raise self.error
        assert self.closed
        return self.events


# -- services -------------------------------------------------------------------------------


def test_a_client_of_one_process_gets_every_event_of_a_job_created_on_another(
    postgresql_url: str, service_factory: ServiceLauncher
) -> None:
    a, b = pair(service_factory, postgresql_url, MOVING)
    with a.client(timeout=20) as on_a, b.client(timeout=20) as on_b:
        job_id = create_job(on_b, inline_body(40))

        def two_progress(events: list[ServerSentEvent]) -> bool:
            return sum(e.event == "progress" for e in events) >= 2

        first, closed = read_stream(on_a, "GET", f"/api/job/{job_id}/stream", stop=two_progress)
        assert not closed and first[0].event == "status"
        # The rest from the other process, resumed with Last-Event-ID.
        last = int(first[-1].id)
        second, closed = read_stream(
            on_b, "GET", f"/api/job/{job_id}/stream", headers={"Last-Event-ID": str(last)}
        )
        assert closed
        real = [*not_pings(first), *not_pings(second)]
        assert_ids(real)
        assert consecutive(real[1:]), [e.id for e in real]
        assert real[-1].event == "completed" and data(real[-1])["result"]["succeeded"] == 40
        assert as_log(real[1:]) == log_after(on_a, job_id, int(real[0].id))

        # A whole stream on A of a job created on B: status, progress..., completed.
        job_id = create_job(on_b, inline_body(40))
        events, closed = read_stream(on_a, "GET", f"/api/job/{job_id}/stream")
        assert closed
        real = not_pings(events)
        assert real[0].event == "status" and real[-1].event == "completed"
        assert {e.event for e in real[1:-1]} <= {"status", "progress"}
        assert any(e.event == "progress" for e in real)
        assert consecutive(real[1:]), [e.id for e in real]
        assert as_log(real[1:]) == log_after(on_b, job_id, int(real[0].id))


def test_streams_survive_their_listen_connection_being_terminated(
    postgresql_url: str, service_factory: ServiceLauncher
) -> None:
    a, b = pair(service_factory, postgresql_url, SLOW)
    [listener] = eventually(lambda: listen_backends(postgresql_url, a), 30, 0.1, "A listens")
    with a.client(timeout=20) as on_a, b.client(timeout=20) as on_b:
        job_id = create_job(on_b, inline_body(40))
        reader = StreamReader(a, job_id)
        eventually(lambda: any(e.event == "progress" for e in reader.events), 60, 0.05, "progress")
        terminate(postgresql_url, [listener])
        events = reader.join()
        real = not_pings(events)
        assert real[0].event == "status" and real[-1].event == "completed"
        assert consecutive(real[1:]), [e.id for e in real]
        assert as_log(real[1:]) == log_after(on_a, job_id, int(real[0].id))

        # The hub noticed, said so, and listens again on a new connection.
        renewed = eventually(
            lambda: [p for p in listen_backends(postgresql_url, a) if p != listener],
            60, 0.1, "a new LISTEN connection",
        )  # fmt: skip
        log = eventually(
            lambda: (text := a.log_path.read_text()) and "re-opened" in text and text,
            30, 0.1, "the reconnect in the log",
        )  # fmt: skip
        assert "LISTEN connection to PostgreSQL lost" in log

        # Notifications reach the new connection: a new job streams whole.
        job_id = create_job(on_b, inline_body(10))
        events, closed = read_stream(on_a, "GET", f"/api/job/{job_id}/stream")
        assert closed and listen_backends(postgresql_url, a) == renewed
        real = not_pings(events)
        assert real[-1].event == "completed" and consecutive(real[1:])
        assert as_log(real[1:]) == log_after(on_a, job_id, int(real[0].id))


def test_deleting_a_job_on_one_process_ends_its_stream_on_another(
    postgresql_url: str, service_factory: ServiceLauncher
) -> None:
    a, b = pair(service_factory, postgresql_url, HELD)
    with a.client(timeout=20) as on_a, b.client(timeout=20) as on_b:
        job_id = create_job(on_a, inline_body(1))
        wait_status(on_a, job_id, ["running"])
        reader = StreamReader(a, job_id)
        eventually(lambda: reader.events, 30, 0.05, "the stream open")
        answer = on_b.delete(f"/api/job/{job_id}", params={"force": "true"})
        assert answer.status_code == 200, answer.text
        events = reader.join()
        assert events[-1].event == "error" and events[-1].id
        # A forced delete cancels, then deletes (as on SQLite, see test_sse.py).
        assert data(events[-1])["code"] in ("DELETED", "CANCELLED"), data(events[-1])
        eventually(
            lambda: on_a.get(f"/api/job/{job_id}/status").status_code == 404,
            30, 0.1, "the forced delete finished",
        )  # fmt: skip


def test_two_processes_post_each_finished_job_exactly_once(
    postgresql_url: str, service_factory: ServiceLauncher
) -> None:
    receiver = WebhookReceiver().start()
    try:
        a, b = pair(
            service_factory, postgresql_url, FAST_EMULATOR_CONFIG,
            "--notify-url", receiver.url("/service"), "--notify-allow-private",
        )  # fmt: skip
        jobs = []
        with a.client(timeout=20) as on_a, b.client(timeout=20) as on_b:
            for n in range(8):
                client = on_a if n % 2 else on_b
                options = {"notify_url": receiver.url("/job")} if n % 4 < 2 else {}
                jobs.append(create_job(client, inline_body(2, prefix=f"n{n}-", **options)))
        final = wait_all(a, jobs, TERMINAL, timeout=120)
        assert {s["status"] for s in final.values()} == {"completed"}

        with SqlLedger(postgresql_url) as ledger:
            eventually(
                lambda: ledger.count_pending_deliveries() == 0
                and len(receiver.by_job("/service")) == len(jobs),
                60, 0.1, "every delivery made",
            )  # fmt: skip
        service_posts = receiver.by_job("/service")
        job_posts = receiver.by_job("/job")
        assert {job: len(posts) for job, posts in service_posts.items()} == dict.fromkeys(jobs, 1)
        hooked = [job for n, job in enumerate(jobs) if n % 4 < 2]
        assert {job: len(posts) for job, posts in job_posts.items()} == dict.fromkeys(hooked, 1)
        for post in receiver.received():
            assert post["status"] == 200 and post["body"]["event"] == "completed"
            assert post["headers"]["x-gembatch-event-id"] == str(post["body"]["event_id"])
    finally:
        receiver.stop()


# -- the hub, the notifier and the claims, in this process ------------------------------------


@pytest.fixture
def pg_ledger(postgresql_url: str) -> Iterator[SqlLedger]:
    with SqlLedger(postgresql_url, on_change=events_for) as ledger:
        yield ledger


async def until(probe: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)
    return value


async def follow(queue: asyncio.Queue[HubEvent | None], timeout: float = 60.0) -> list[HubEvent]:
    """What the hub publishes to one subscriber, up to a terminal event or a deletion."""
    got: list[HubEvent] = []
    while True:
        event = await asyncio.wait_for(queue.get(), timeout)
        assert event is not None, "the subscriber was closed"
        got.append(event)
        if event.deleted or event.type in TERMINAL_EVENTS:
            return got


def log_of(ledger: SqlLedger, job_id: str, after: int) -> list[tuple[int, str, dict]]:
    return [(e.seq, e.type, e.data) for e in ledger.events_after(job_id, after)]


def published(events: list[HubEvent]) -> list[tuple[int, str, dict]]:
    return [(e.seq, e.type, e.data) for e in events]


def test_hub_publishes_each_event_once_in_order_while_notifications_and_requery_race(
    pg_ledger: SqlLedger,
) -> None:
    pg_ledger.add_many([new_record("jrace")])

    async def scenario() -> tuple[list[HubEvent], HubEvent]:
        hub = EventHub(pg_ledger, requery_interval=0.02)  # re-reads all the time
        stop = asyncio.Event()
        task = asyncio.create_task(hub.run(stop))
        await until(lambda: hub.listening, what="LISTEN")
        queue = hub.subscribe("jrace")
        writing = asyncio.create_task(asyncio.to_thread(advance, pg_ledger, "jrace", TO_COMPLETED))
        got = await follow(queue)
        await writing
        log = await asyncio.to_thread(log_of, pg_ledger, "jrace", got[0].seq - 1)
        await asyncio.to_thread(pg_ledger.delete_job, "jrace", actor="test", reason="test")
        [gone] = await follow(queue)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert published(got) == log
        return got, gone

    got, gone = asyncio.run(scenario())
    assert [e.seq for e in got] == list(range(got[0].seq, got[0].seq + len(got)))
    assert got[-1].type == "completed" and len(got) >= 5
    assert gone.deleted and gone.data["code"] == "DELETED"


def test_one_write_of_many_jobs_notifies_each_of_them_once(
    pg_ledger: SqlLedger, postgresql_url: str
) -> None:
    ids = [f"jmany{n}" for n in range(5)]
    with psycopg.connect(psycopg_url(postgresql_url), autocommit=True) as listener:
        listener.execute(f'LISTEN "{pg_ledger.notify_channel}"')
        pg_ledger.add_many([new_record(job_id) for job_id in ids])  # one transaction
        added = [n.payload for n in listener.notifies(timeout=10, stop_after=len(ids))]
        pg_ledger.delete_job(ids[0], actor="test", reason="test")
        deleted = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    assert sorted(added) == sorted(f"{job_id} 1" for job_id in ids)
    assert deleted == [f"{ids[0]} deleted"]


def test_hub_ends_streams_of_a_job_deleted_elsewhere_on_its_notification(
    pg_ledger: SqlLedger,
) -> None:
    pg_ledger.add_many([new_record("jdoomed")])

    async def scenario() -> list[HubEvent]:
        hub = EventHub(pg_ledger, requery_interval=3600)  # only NOTIFY can tell
        stop = asyncio.Event()
        task = asyncio.create_task(hub.run(stop))
        await until(lambda: hub.listening, what="LISTEN")
        queue = hub.subscribe("jdoomed")
        await follow_one(queue)  # the hub has read the job: it follows it now
        await asyncio.to_thread(pg_ledger.delete_job, "jdoomed", actor="test", reason="test")
        gone = await follow(queue)
        stop.set()
        await asyncio.wait_for(task, 30)
        return gone

    [gone] = asyncio.run(scenario())
    assert gone.deleted and gone.type == "error" and gone.data["code"] == "DELETED"


def test_hub_without_notifications_delivers_by_requery_and_sees_deletions(
    pg_ledger: SqlLedger,
) -> None:
    """LISTEN never connects (nothing listens where it points): events and the deletion
    still arrive, through the periodic re-query."""
    pg_ledger.add_many([new_record("jquiet")])
    port = int(closed_port_url().rsplit(":", 1)[1].split("/")[0])
    listen_url = f"postgresql://postgres@127.0.0.1:{port}/test"

    async def scenario() -> tuple[list[HubEvent], HubEvent, EventHub]:
        hub = EventHub(pg_ledger, requery_interval=0.2, listen_url=listen_url)
        stop = asyncio.Event()
        task = asyncio.create_task(hub.run(stop))
        queue = hub.subscribe("jquiet")
        await asyncio.to_thread(advance, pg_ledger, "jquiet", TO_COMPLETED)
        got = await follow(queue)
        await asyncio.to_thread(pg_ledger.delete_job, "jquiet", actor="test", reason="test")
        [gone] = await follow(queue)
        stop.set()
        await asyncio.wait_for(task, 30)
        return got, gone, hub

    got, gone, hub = asyncio.run(scenario())
    assert [e.seq for e in got] == list(range(got[0].seq, got[0].seq + len(got)))
    assert got[-1].type == "completed"
    assert gone.deleted
    assert not hub.listening and hub.listen_opens == 0 and hub.listen_losses >= 1
    assert hub.last_listen_error


class SilentProxy:
    """A TCP proxy to PostgreSQL that can turn every connection open so far into a black
    hole (bytes dropped both ways, nothing closed: a half-open connection); connections
    opened later pass."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.generation = 0
        self.silenced = -1
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def silence(self) -> None:
        self.silenced = self.generation

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.generation += 1
        mine = self.generation
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    if mine > self.silenced:
                        dst.write(chunk)
                        await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


def test_hub_replaces_a_silent_listen_connection_and_catches_up(
    pg_ledger: SqlLedger, postgresql_url: str
) -> None:
    """The LISTEN connection goes silent (half-open: no error, no data). With the periodic
    re-query out of the way, events still arrive: the hub finds the connection dead when
    it stops answering, opens another, and re-reads the job."""
    pg_ledger.add_many([new_record("jsilent")])
    url = sa.make_url(postgresql_url)

    async def scenario() -> tuple[list[HubEvent], EventHub]:
        proxy = await SilentProxy(url.host or "127.0.0.1", url.port or 5432).start()
        through = url.set(drivername="postgresql", host="127.0.0.1", port=proxy.port)
        hub = EventHub(
            pg_ledger,
            requery_interval=3600,
            listen_check=0.5,
            listen_url=through.render_as_string(hide_password=False),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(hub.run(stop))
        await until(lambda: hub.listening, what="LISTEN")
        queue = hub.subscribe("jsilent")
        [first] = await follow_one(queue)
        await asyncio.to_thread(advance, pg_ledger, "jsilent", TO_COMPLETED[:1])
        [heard] = await follow_one(queue)  # through the proxy: notifications work
        assert heard.seq == first.seq + 1
        proxy.silence()
        await asyncio.to_thread(advance, pg_ledger, "jsilent", TO_COMPLETED[1:])
        got = [first, heard, *await follow(queue, timeout=90)]
        await until(lambda: hub.listen_opens >= 2 and hub.listening, 60, "LISTEN again")
        stop.set()
        await asyncio.wait_for(task, 60)
        await proxy.close()
        log = await asyncio.to_thread(log_of, pg_ledger, "jsilent", first.seq - 1)
        assert published(got) == log
        return got, hub

    got, hub = asyncio.run(scenario())
    assert got[-1].type == "completed"
    assert hub.listen_losses >= 1 and hub.listen_opens >= 2


async def follow_one(queue: asyncio.Queue[HubEvent | None]) -> list[HubEvent]:
    event = await asyncio.wait_for(queue.get(), 30)
    assert event is not None
    return [event]


def test_notifier_queues_an_event_that_commits_after_a_later_one(
    pg_ledger: SqlLedger, postgresql_url: str
) -> None:
    """On PostgreSQL an event id is taken at insert and becomes visible at commit: a slow
    transaction's event can appear below ids the notifier has read already. The cursor
    must not have moved past it."""
    pg_ledger.add_many([new_record("jslow"), new_record("jfast")])
    hook = "http://127.0.0.1:9/hook"
    notifier = Notifier(
        pg_ledger, allow_private=True, service_url=hook
    )  # PostgreSQL: settles in 30 s
    slow = psycopg.connect(psycopg_url(postgresql_url))
    try:
        body = json.dumps({"job_id": "jslow", "status": "completed"})
        (slow_id,) = slow.execute(
            "INSERT INTO job_events (job_id, seq, type, data, created_at) "
            "VALUES ('jslow', 1000, 'completed', %s, '2025-01-01T00:00:00Z') RETURNING id",
            (body,),
        ).fetchone()  # taken, not committed
        advance(pg_ledger, "jfast", TO_COMPLETED)
        fast_id = pg_ledger.events_since(0, types=["completed"])[-1].id
        assert fast_id > slow_id
        asyncio.run(notifier.queue_events())
        assert queued(pg_ledger) == {fast_id}
        assert int(pg_ledger.meta_get(CURSOR_KEY) or 0) < slow_id
        slow.commit()
    finally:
        slow.close()
    asyncio.run(notifier.queue_events())
    assert queued(pg_ledger) == {fast_id, slow_id}
    # Once settled the cursor moves past both; nothing is queued twice.
    settled = Notifier(pg_ledger, allow_private=True, service_url=hook, settle_seconds=0)
    asyncio.run(settled.queue_events())
    assert int(pg_ledger.meta_get(CURSOR_KEY) or 0) >= fast_id
    assert queued(pg_ledger) == {fast_id, slow_id}


def queued(ledger: SqlLedger) -> set[int]:
    return {d.event_id for d in ledger.due_deliveries(time.time() + 86400, limit=1000)}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gembatch.db'}"
    return str(request.getfixturevalue("postgresql_url"))


def test_each_due_delivery_is_claimed_by_one_claimant_until_its_lease_ends(
    any_db_url: str,
) -> None:
    now = time.time()
    with SqlLedger(any_db_url) as ledger:
        for n in range(1, 61):
            ledger.enqueue_delivery(n, None, "http://127.0.0.1:9/hook", {"n": n}, next_at=now)
    claims: list[list[int]] = [[] for _ in range(4)]

    def claimant(mine: list[int]) -> None:
        with SqlLedger(any_db_url) as ledger:  # its own connections, as another process
            while batch := ledger.claim_due_deliveries(now, 60.0, limit=7):
                mine.extend(d.event_id for d in batch)
                assert all(d.next_at == now + 60.0 for d in batch)

    threads = [threading.Thread(target=claimant, args=(mine,)) for mine in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    taken = [n for mine in claims for n in mine]
    assert sorted(taken) == list(range(1, 61))  # every one, once
    with SqlLedger(any_db_url) as ledger:
        assert ledger.claim_due_deliveries(now + 30, 60.0) == []  # leased
        again = ledger.claim_due_deliveries(now + 61, 60.0, limit=100)  # the lease ran out
        assert sorted(d.event_id for d in again) == list(range(1, 61))
        assert {d.attempts for d in again} == {0}  # a claim is not an attempt
