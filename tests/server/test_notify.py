"""Webhook notifications: a real HTTP receiver, a real SQLite ledger, jobs driven through
the engine's reducers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gembatch import __version__
from gembatch.engine import reducers
from gembatch.jobs import Job, RequestCounts, RetryConfig
from gembatch.server.events import events_for
from gembatch.server.notify import Notifier, safe_url

OWNER = {"pid": 1, "host": "test", "role": "test", "token": "t"}
SUCCEEDED = {
    "name": "batches/x",
    "state": "JOB_STATE_SUCCEEDED",
    "dest": {"file_name": "files/batch-x"},
}
FAILED = {"name": "batches/x", "state": "JOB_STATE_FAILED", "error": {"message": "boom"}}


# -- a webhook receiver ---------------------------------------------------------------------


class Receiver:
    """A Starlette app on 127.0.0.1 in a thread: records every POST to /NAME, and answers
    500 to the first `fail_first[NAME]` of them."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.fail_first: dict[str, int] = {}
        self.delay = 0.0
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/{name}", self._hook, methods=["POST"])])
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])), daemon=True
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def _hook(self, request: Request) -> Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        name = request.path_params["name"]
        body = await request.body()
        with self._lock:
            self.posts.append({"name": name, "headers": dict(request.headers), "body": body})
            failing = self.fail_first.get(name, 0)
            if failing:
                self.fail_first[name] = failing - 1
                return JSONResponse({"error": "try later"}, status_code=500)
        return JSONResponse({"ok": True})

    def received(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p["body"]) for p in self.posts if p["name"] == name]

    def start(self) -> Receiver:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def closed_port_url() -> str:
    """A URL where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


# -- a ledger with jobs ---------------------------------------------------------------------


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gembatch.db'}"


@pytest.fixture
def ledger(db_url: str) -> Iterator[Any]:
    from gembatch.ledger.sql import SqlLedger

    led = SqlLedger(db_url, on_change=events_for)
    yield led
    close = getattr(led, "close", None)
    if callable(close):
        close()


def new_record(job_id: str, notify_url: str | None = None, n: int = 3) -> dict[str, Any]:
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"{job_id}.jsonl",
        input_path=f"/data/{job_id}.jsonl",
        sha256="0" * 64,
        size_bytes=100,
        count=n,
        plans=[(0, n, n)],
        model="gemini-2.5-flash-lite",
        priority=0,
        retry_config=RetryConfig(max_attempts=1),
        max_parallel_tasks=None,
        result_file=f"/data/results/{job_id}.jsonl",
        now=time.time(),
    )
    record = job.to_record()
    if notify_url:
        record["notify_url"] = notify_url
    return record


Step = Callable[[Job, float], Job]

TO_SUBMITTED: list[Step] = [
    lambda j, t: reducers.claim_upload(j, 0, OWNER, t),
    lambda j, t: reducers.uploaded(j, 0, "files/in-x", t),
    lambda j, t: reducers.claim_create(j, 0, OWNER, t),
    lambda j, t: reducers.created(j, 0, {"name": "batches/x", "state": "JOB_STATE_PENDING"}, t),
]
TO_COMPLETED: list[Step] = [
    *TO_SUBMITTED,
    lambda j, t: reducers.polled(j, 0, SUCCEEDED, RequestCounts(3, 3, 0), t),
    lambda j, t: reducers.claim_download(j, 0, OWNER, t),
    lambda j, t: reducers.downloaded(j, 0, "/data/part", RequestCounts(3, 3, 0), t),
    lambda j, t: reducers.cleaned(j, 0, {"input_file": True, "batch": True}, [], t),
    lambda j, t: reducers.finalize(j, t, results_complete=True),
]
TO_FAILED: list[Step] = [
    *TO_SUBMITTED,
    lambda j, t: reducers.polled(j, 0, FAILED, None, t),
    lambda j, t: reducers.finalize(j, t, results_complete=False),
]


def advance(ledger: Any, job_id: str, steps: list[Step]) -> dict[str, Any]:
    """Apply each step as its own ledger write, as the engine does."""
    record: dict[str, Any] = {}
    for step in steps:

        def change(current: dict[str, Any], step: Step = step) -> dict[str, Any]:
            return step(Job.from_record(current), time.time()).to_record()

        result = ledger.apply({job_id: change})
        assert not result.errors, result.errors
        record = result.records[job_id]
    return record


async def drain(notifier: Notifier, rounds: int = 5) -> None:
    try:
        for _ in range(rounds):
            await notifier.run_once()
    finally:
        await notifier.aclose()


def deliveries(ledger: Any) -> list[Any]:
    """Every delivery not delivered yet (including those waiting for their backoff)."""
    return ledger.due_deliveries(time.time() + 10 * 86400, limit=1000)


# -- tests ----------------------------------------------------------------------------------


def test_one_post_per_finished_job_per_url_with_the_documented_shape(
    ledger: Any, receiver: Receiver
) -> None:
    ledger.add_many(
        [
            new_record("jok", receiver.url("job")),
            new_record("jbad", receiver.url("job")),
            new_record("jquiet"),  # no notify_url: only the service-wide URL hears of it
            new_record("jrunning", receiver.url("job")),
        ]
    )
    advance(ledger, "jok", TO_COMPLETED)
    advance(ledger, "jbad", TO_FAILED)
    advance(ledger, "jquiet", TO_COMPLETED)
    advance(ledger, "jrunning", TO_SUBMITTED)

    notifier = Notifier(ledger, allow_private=True, service_url=receiver.url("service"))
    asyncio.run(drain(notifier))

    job_posts = receiver.received("job")
    assert sorted((p["job"]["job_id"], p["event"]) for p in job_posts) == [
        ("jbad", "error"),
        ("jok", "completed"),
    ]
    service_posts = receiver.received("service")
    assert sorted((p["job"]["job_id"], p["event"]) for p in service_posts) == [
        ("jbad", "error"),
        ("jok", "completed"),
        ("jquiet", "completed"),
    ]
    ok = next(p for p in job_posts if p["job"]["job_id"] == "jok")
    assert set(ok) == {"event", "event_id", "job", "sent_at"}
    assert ok["job"]["status"] == "completed" and ok["job"]["progress"] == 1.0
    assert ok["job"]["result"]["results_url"] == "/api/job/jok/results"
    bad = next(p for p in job_posts if p["job"]["job_id"] == "jbad")
    assert bad["job"]["status"] == "failed" and bad["job"]["code"] == "BATCH_FAILED"
    assert "boom" in bad["job"]["error"]
    raw = next(p for p in receiver.posts if json.loads(p["body"])["job"]["job_id"] == "jok")
    assert raw["headers"]["content-type"] == "application/json"
    assert raw["headers"]["user-agent"] == f"gembatch/{__version__}"
    assert raw["headers"]["x-gembatch-event-id"] == str(ok["event_id"])
    assert deliveries(ledger) == []


def test_a_deletion_is_not_notified(ledger: Any, receiver: Receiver) -> None:
    """A deletion produces an `error` event with code DELETED: not a job finishing."""
    record = new_record("jdel", receiver.url("job"))
    ledger.add_many([record])
    [deleted] = events_for(ledger.get("jdel"), None)
    assert deleted.type == "error" and deleted.data["code"] == "DELETED"
    ledger.append_event("jdel", deleted)
    asyncio.run(drain(Notifier(ledger, allow_private=True, service_url=receiver.url("service"))))
    assert receiver.posts == []
    assert deliveries(ledger) == []


def test_a_job_deleted_after_finishing_is_still_notified_once(
    ledger: Any, receiver: Receiver
) -> None:
    ledger.add_many([new_record("jgone", receiver.url("job"))])
    advance(ledger, "jgone", TO_COMPLETED)
    receiver.fail_first["job"] = 1
    clock = [time.time()]
    notifier = Notifier(
        ledger, allow_private=True, base_delay=0.5, max_delay=1.0, clock=lambda: clock[0]
    )

    async def scenario() -> None:
        await notifier.run_once()  # queued; the first POST gets a 500
        await asyncio.to_thread(ledger.delete_job, "jgone", actor="test", reason="cleanup")
        clock[0] += 5
        await drain(notifier)

    asyncio.run(scenario())
    posts = receiver.received("job")
    assert [p["event"] for p in posts] == ["completed", "completed"]
    assert posts[0] == {**posts[1], "sent_at": posts[0]["sent_at"]}
    assert deliveries(ledger) == []


def test_retried_after_500s_then_delivered_once(ledger: Any, receiver: Receiver) -> None:
    receiver.fail_first["job"] = 2
    ledger.add_many([new_record("jretry", receiver.url("job"))])
    advance(ledger, "jretry", TO_COMPLETED)
    clock = [time.time()]
    notifier = Notifier(
        ledger, allow_private=True, base_delay=1.0, max_delay=5.0, clock=lambda: clock[0]
    )

    async def scenario() -> None:
        await notifier.run_once()
        assert len(receiver.received("job")) == 1  # a 500
        [pending] = deliveries(ledger)
        assert pending.attempts == 1 and "HTTP 500" in (pending.last_error or "")
        assert clock[0] < pending.next_at <= clock[0] + 5.0
        await notifier.run_once()
        assert len(receiver.received("job")) == 1, "not sent again before its backoff"
        for _ in range(4):
            clock[0] += 6.0  # past the capped backoff
            await notifier.run_once()

    asyncio.run(scenario())
    posts = receiver.received("job")
    assert len(posts) == 3  # two 500s, then delivered, then never again
    assert len({p["event_id"] for p in posts}) == 1
    assert deliveries(ledger) == []


def test_a_restarted_notifier_sends_nothing_twice_and_skips_nothing(
    ledger: Any, receiver: Receiver, db_url: str
) -> None:
    from gembatch.ledger.sql import SqlLedger

    ledger.add_many([new_record(f"j{i}", receiver.url("job")) for i in range(6)])
    for i in range(3):
        advance(ledger, f"j{i}", TO_COMPLETED)
    asyncio.run(drain(Notifier(ledger, allow_private=True, service_url=receiver.url("service"))))
    assert len(receiver.received("job")) == 3

    # Jobs finish while no notifier runs; then a new process opens the same database.
    advance(ledger, "j3", TO_COMPLETED)
    advance(ledger, "j4", TO_FAILED)
    reopened = SqlLedger(db_url, on_change=events_for)
    asyncio.run(drain(Notifier(reopened, allow_private=True, service_url=receiver.url("service"))))
    advance(ledger, "j5", TO_COMPLETED)
    asyncio.run(drain(Notifier(reopened, allow_private=True, service_url=receiver.url("service"))))

    for name in ("job", "service"):
        ids = [p["job"]["job_id"] for p in receiver.received(name)]
        assert sorted(ids) == [f"j{i}" for i in range(6)], name  # each once, none missing
    assert deliveries(reopened) == []


def test_gives_up_after_max_attempts_and_audits_it(ledger: Any, receiver: Receiver) -> None:
    receiver.fail_first["job"] = 100
    url = receiver.url("job").replace("127.0.0.1", "hookuser:s3cret@127.0.0.1") + "?token=abc"
    ledger.add_many([new_record("jdown", url)])
    advance(ledger, "jdown", TO_COMPLETED)
    clock = [time.time()]
    notifier = Notifier(
        ledger,
        allow_private=True,
        max_attempts=3,
        base_delay=0.1,
        max_delay=1.0,
        clock=lambda: clock[0],
    )

    async def scenario() -> None:
        for _ in range(6):
            await notifier.run_once()
            clock[0] += 2.0

    asyncio.run(scenario())
    assert len(receiver.received("job")) == 3
    assert deliveries(ledger) == []  # given up: no longer due, ever
    audit = _audit_rows(ledger, "jdown")
    gave_up = [row for row in audit if row["action"] == "notify_failed"]
    assert len(gave_up) == 1
    text = json.dumps(gave_up[0], default=str)
    assert "s3cret" not in text and "hookuser" not in text and "token=abc" not in text
    assert "HTTP 500" in text


def test_a_receiver_that_is_down_raises_nothing_and_blocks_no_ledger_write(
    ledger: Any,
) -> None:
    """Connections refused (down) and a receiver that never answers (hung): the loop keeps
    going, errors are recorded, and the engine's writes go through meanwhile."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # accepts connections in the kernel, never answers
    hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}/hook"
    ledger.add_many([new_record("jdown", closed_port_url()), new_record("jhung", hung_url)])
    ledger.add_many([new_record(f"w{i}") for i in range(5)])
    advance(ledger, "jdown", TO_COMPLETED)
    advance(ledger, "jhung", TO_COMPLETED)

    async def scenario() -> tuple[int, float]:
        stop = asyncio.Event()
        notifier = Notifier(ledger, allow_private=True, timeout=3.0)
        task = asyncio.create_task(notifier.run(stop))
        await asyncio.sleep(0.3)  # the hung POST is in flight now
        for i in range(5):  # the engine's writes, from its own thread as the service does
            await asyncio.to_thread(advance, ledger, f"w{i}", TO_SUBMITTED[:2])
        # ... all done while that POST still waits for its answer,
        [hung_row] = [d for d in deliveries(ledger) if d.job_id == "jhung"]
        # ... and the event loop itself stays responsive.
        tick = time.monotonic()
        await asyncio.sleep(0.01)
        lag = time.monotonic() - tick
        await asyncio.sleep(3.5)  # the hung POST times out
        stop.set()
        await asyncio.wait_for(task, 5)
        assert not task.cancelled() and task.exception() is None
        return hung_row.attempts, lag

    attempts_during_writes, lag = asyncio.run(scenario())
    hung.close()
    assert attempts_during_writes == 0, "the writes waited for the hung POST"
    assert lag < 0.5
    pending = {d.job_id: d for d in deliveries(ledger)}
    assert set(pending) == {"jdown", "jhung"}
    assert pending["jdown"].attempts >= 1 and "Connect" in (pending["jdown"].last_error or "")
    assert pending["jhung"].attempts == 1 and "Timeout" in (pending["jhung"].last_error or "")
    assert all(ledger.get(f"w{i}")["status"] == "running" for i in range(5))


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("https://u:p@hooks.example.com:8443/a/b?token=x#f") == (
        "https://hooks.example.com:8443/a/b"
    )
    assert safe_url("http://u:p@[::1]:9000/x?k=v") == "http://[::1]:9000/x"
    assert safe_url("http://host:99999999/x") == "<invalid URL>"


def _audit_rows(ledger: Any, job_id: str) -> list[dict[str, Any]]:
    """The audit rows of a job, through the ledger's own reader."""
    for name in ("audit_rows", "audit_log", "list_audit"):
        reader = getattr(ledger, name, None)
        if callable(reader):
            return [dict(row) for row in reader(job_id)]
    import sqlalchemy as sa

    from gembatch.ledger.migrations import audit

    with ledger.engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(sa.select(audit).where(audit.c.job_id == job_id))
        ]
