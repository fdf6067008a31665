"""Server-Sent Events of `gembatch serve` (seed 003's streaming pattern), read with
httpx-sse from a real service on a real emulator: the order of events, resuming with
`Last-Event-ID` without loss or duplicates, streams of finished, idle, failing and
deleted jobs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    create_job,
    events_of,
    eventually,
    inline_body,
    wait_status,
)

# 40 requests over 3 s of RUNNING: the batch's counts move in several polls.
MOVING = {"clock": {"pending_seconds": 0.5, "running_seconds": 3.0}}
HELD = {"clock": {"pending_seconds": 30.0, "running_seconds": 1.0}}  # PENDING remotely


def read_stream(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    stop: Callable[[list[ServerSentEvent]], bool] | None = None,
    timeout: float = 60.0,
    **kwargs: Any,
) -> tuple[list[ServerSentEvent], bool]:
    """The events of one SSE connection, until the server closes it (closed=True) or
    `stop(events)` is true (then the client disconnects: closed=False)."""
    events: list[ServerSentEvent] = []
    deadline = time.monotonic() + timeout
    with connect_sse(client, method, url, **kwargs) as source:
        response = source.response
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            events.append(event)
            if stop is not None and stop(events):
                return events, False
            assert time.monotonic() < deadline, f"stream still open after {timeout} s"
    return events, True


def data(event: ServerSentEvent) -> dict[str, Any]:
    return json.loads(event.data)


def not_pings(events: list[ServerSentEvent]) -> list[ServerSentEvent]:
    return [e for e in events if e.event != "ping"]


def as_log(events: list[ServerSentEvent]) -> list[tuple[int, str, dict[str, Any]]]:
    return [(int(e.id), e.event, data(e)) for e in events]


def log_after(client: httpx.Client, job_id: str, seq: int) -> list[tuple[int, str, dict]]:
    return [(e["seq"], e["type"], e["data"]) for e in events_of(client, job_id) if e["seq"] > seq]


def assert_ids(events: list[ServerSentEvent]) -> None:
    """Every event has a numeric id; events other than `ping` have strictly increasing
    ids; a `ping` repeats the id of the last event (where a reconnect resumes)."""
    last = 0
    for event in events:
        assert event.id and event.id.isdigit(), f"{event.event} without an id"
        number = int(event.id)
        if event.event == "ping":
            assert number == last, (event.event, number, last)
        else:
            assert number > last, f"{event.event} id {number} after {last}"
        last = number


def test_stream_from_creation_sends_status_then_progress_then_completed_and_closes(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(MOVING)
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(40))
        events, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream")
        assert closed
        assert_ids(events)
        real = not_pings(events)
        assert real[0].event == "status"
        assert data(real[0])["job_id"] == job_id
        assert data(real[0])["status"] in ("pending", "running")
        assert real[-1].event == "completed"
        assert [e.event for e in real[1:-1]] and {e.event for e in real[1:-1]} <= {
            "status", "progress",
        }  # fmt: skip
        done = data(real[-1])
        assert done["status"] == "completed" and done["progress"] == 1.0
        assert done["result"]["results_url"] == f"/api/job/{job_id}/results"
        assert done["result"]["succeeded"] == 40
        processing = [
            data(e)["requests"]["succeeded"]
            for e in real
            if e.event == "progress" and data(e)["current_step"] == "processing"
        ]
        assert len(set(processing)) >= 3, f"counts did not move: {processing}"
        assert processing == sorted(processing)
        assert as_log(real[1:]) == log_after(client, job_id, int(real[0].id))


def test_post_stream_creates_the_job_and_streams_it(service_factory: ServiceLauncher) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    with svc.client(timeout=20) as client:
        events, closed = read_stream(
            client, "POST", "/api/job/batch/stream", json=inline_body(3, display_name="streamed")
        )
        assert closed
        assert_ids(events)
        real = not_pings(events)
        assert real[0].event == "status" and real[-1].event == "completed"
        job_id = data(real[0])["job_id"]
        assert {data(e)["job_id"] for e in real} == {job_id}
        # The creator gets the job's whole log, from its first event (not a snapshot
        # taken when the stream began, which could start after the first steps).
        assert as_log(real) == log_after(client, job_id, 0)
        status = client.get(f"/api/job/{job_id}/status").json()
        assert status["status"] == "completed" and status["display_name"] == "streamed"
        bad = client.post("/api/job/batch/stream", json={"requests": []})
        assert bad.status_code == 422 and bad.json()["detail"]


def test_reconnect_with_last_event_id_gets_exactly_the_missed_events(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(MOVING)
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(40))

        def mid_job(events: list[ServerSentEvent]) -> bool:
            moving = [
                e for e in events
                if e.event == "progress" and data(e)["current_step"] == "processing"
            ]  # fmt: skip
            return len(moving) >= 2

        first, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream", stop=mid_job)
        assert not closed
        last = int(first[-1].id)
        second, closed = read_stream(
            client, "GET", f"/api/job/{job_id}/stream", headers={"Last-Event-ID": str(last)}
        )
        assert closed
        assert_ids([*not_pings(first), *second])
        resumed = not_pings(second)
        assert [int(e.id) for e in resumed] == list(range(last + 1, last + 1 + len(resumed)))
        assert resumed[-1].event == "completed"
        snapshot = int(first[0].id)
        assert as_log([*not_pings(first)[1:], *resumed]) == log_after(client, job_id, snapshot)
        # The same through the query parameter (for EventSource, which cannot set headers).
        again, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream?last_event_id={last}")
        assert closed and as_log(not_pings(again)) == as_log(resumed)
        bad = client.get(f"/api/job/{job_id}/stream", headers={"Last-Event-ID": "soon"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["detail"]


def test_stream_of_a_finished_job_sends_the_snapshot_and_the_terminal_event(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(2))
        assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
        events, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream")
        assert closed
        assert [e.event for e in events] == ["status", "completed"]
        assert data(events[0])["status"] == "completed"
        assert data(events[1])["result"]["results_url"] == f"/api/job/{job_id}/results"
        last_seq = events_of(client, job_id)[-1]["seq"]
        assert [int(e.id) for e in events] == [last_seq, last_seq]  # nothing more to resume
        missing = client.get("/api/job/j00000000/stream")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "Job not found: j00000000"}


def test_resuming_a_finished_job_after_its_last_event_ends_at_once_with_204(
    service_factory: ServiceLauncher,
) -> None:
    """Seed 003's useJob never closes its EventSource: after `completed` the browser
    reconnects with the terminal event's id. It must be told to stop (204), not be kept
    on a stream that only pings."""
    svc = service_factory(FAST_EMULATOR_CONFIG, args=["--ping-interval", "0.3"])
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(2))
        events, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream")
        assert closed and not_pings(events)[-1].event == "completed"
        last = int(not_pings(events)[-1].id)
        for resume_at in (last, last + 5):
            answer = client.get(
                f"/api/job/{job_id}/stream", headers={"Last-Event-ID": str(resume_at)}
            )
            assert answer.status_code == 204 and answer.content == b""
        # One id short of the end: exactly the terminal event, then the stream closes.
        rest, closed = read_stream(
            client,
            "GET",
            f"/api/job/{job_id}/stream",
            headers={"Last-Event-ID": str(last - 1)},
            timeout=10,
        )
        assert closed
        assert [(int(e.id), e.event) for e in rest] == [(last, "completed")]


def test_idle_stream_sends_ping_events_with_an_id(service_factory: ServiceLauncher) -> None:
    svc = service_factory(HELD)  # the service pings after 1 s without events
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(1))
        started = time.monotonic()
        events, closed = read_stream(
            client,
            "GET",
            f"/api/job/{job_id}/stream",
            stop=lambda events: events[-1].event == "ping",
            timeout=10,
        )
        assert not closed and time.monotonic() - started < 10
        ping = events[-1]
        assert ping.id and int(ping.id) == int(not_pings(events)[-1].id)
        assert isinstance(data(ping)["time"], float)
        assert client.get(f"/api/job/{job_id}/status").json()["status"] == "running"


def test_failing_job_streams_error_with_the_error_text_and_closes(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory({**FAST_EMULATOR_CONFIG, "faults": {"batches": {"fail_rate": 1.0}}})
    with svc.client(timeout=20) as client:
        job_id = create_job(client, inline_body(2))
        events, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream")
        assert closed
        assert_ids(events)
        real = not_pings(events)
        assert real[-1].event == "error"
        assert "completed" not in [e.event for e in real]
        failure = data(real[-1])
        assert failure["status"] == "failed" and failure["code"] == "BATCH_FAILED"
        assert "failed" in failure["error"].lower()
        status = client.get(f"/api/job/{job_id}/status").json()
        assert status["status"] == "failed" and status["error"] == failure["error"]


def test_deleting_a_job_ends_its_stream_with_an_error(service_factory: ServiceLauncher) -> None:
    svc = service_factory(HELD)
    with svc.client(timeout=20) as client, svc.client() as deleter:
        job_id = create_job(client, inline_body(1))
        wait_status(client, job_id, ["running"])
        answers: list[httpx.Response] = []

        def delete_soon() -> None:
            time.sleep(1.0)  # the stream is open and idle by then
            answers.append(deleter.delete(f"/api/job/{job_id}", params={"force": "true"}))

        thread = threading.Thread(target=delete_soon)
        thread.start()
        try:
            events, closed = read_stream(client, "GET", f"/api/job/{job_id}/stream", timeout=30)
        finally:
            thread.join()
        assert answers[0].status_code == 200, answers[0].text
        assert closed
        assert events[-1].event == "error" and events[-1].id
        # A forced delete cancels, then deletes: a stream that reads the log between the two
        # ends on the cancel (CANCELLED); otherwise it finds the job gone (DELETED).
        assert data(events[-1])["code"] in ("DELETED", "CANCELLED"), data(events[-1])
        eventually(
            lambda: client.get(f"/api/job/{job_id}/status").status_code == 404,
            30, 0.1, "the forced delete finished",
        )  # fmt: skip
