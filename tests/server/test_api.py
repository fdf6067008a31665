"""The HTTP job API of `gembatch serve` (seeds 003 and 004), through a real service process
on a real emulator: seed 003's polling pattern and JobStatus, the three ways to create a
job, bad input answered with a 4xx that says what to fix, the DELETE and cleanup rules,
seed 004's `/job-operations` with its strict transitions, per-user isolation, and the
operator's endpoints."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    audit_of,
    create_job,
    events_of,
    eventually,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)

SEED_003_KEYS = {
    "job_id", "job_type", "status", "progress", "current_step", "message", "result", "error",
    "created_at", "updated_at",
}  # fmt: skip
DETAILED_STATUS_KEYS = {
    "current_phase",
    "progress_percentage",
    "active_tasks",
    "error_count",
    "create_outcome_unknown",  # gembatch's own, beside seed 004's
    "remote_cleanup_pending",
}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SEED_003_DELETE_RUNNING = "Cannot delete a running job. Wait for completion or failure"
# Unknown to Batch Mode: the API serves the model (so the service's models.get check lets
# it through; a model it does not serve at all is refused with 422), batches.create answers
# 404 "not supported for batchGenerateContent" and the job fails.
UNKNOWN_MODEL = "gemini-embedding-001"
STUCK = "stuck"  # batches whose display name holds this stay PENDING remotely (see `lab`)


def assert_job_status_shape(body: dict[str, Any]) -> None:
    """Seed 003's JobStatus, plus priority, attempts and seed 004's detailed_status."""
    missing = (SEED_003_KEYS | {"priority", "attempts", "detailed_status"}) - set(body)
    assert not missing, f"JobStatus lacks {missing}: {body}"
    assert body["job_type"] == "batch"
    assert body["status"] in ("pending", "running", "completed", "failed", "cancelled")
    assert isinstance(body["progress"], float | int) and 0.0 <= body["progress"] <= 1.0
    assert isinstance(body["message"], str) and body["message"]
    for name in ("created_at", "updated_at"):
        assert TIMESTAMP.match(body[name]), f"{name}={body[name]!r}"
    assert body["created_at"] <= body["updated_at"]
    assert isinstance(body["priority"], int) and isinstance(body["attempts"], int)
    detailed = body["detailed_status"]
    assert set(detailed) == DETAILED_STATUS_KEYS
    assert detailed["current_phase"] == body["current_step"]
    assert detailed["progress_percentage"] == pytest.approx(body["progress"] * 100, abs=0.1)
    assert isinstance(detailed["active_tasks"], int) and detailed["active_tasks"] >= 0
    assert isinstance(detailed["error_count"], int) and detailed["error_count"] >= 0
    if body["status"] == "completed":
        assert isinstance(body["result"], dict) and body["error"] is None
    elif body["status"] in ("pending", "running"):
        assert body["result"] is None and body["error"] is None
    else:
        assert body["result"] is None and isinstance(body["error"], str) and body["error"]


def result_lines(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/job/{job_id}/results")
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def job_ops(client: httpx.Client, action: str, **data: Any) -> httpx.Response:
    return client.post("/job-operations", json={"action": action, "data": data})


def upload(client: httpx.Client, name: str, text: str, options: dict | None = None) -> str:
    data = {"options": json.dumps(options)} if options is not None else None
    response = client.post("/api/job/batch", files={"file": (name, text)}, data=data)
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


# -- seed 003: create, then poll --------------------------------------------------------------


def test_polling_every_0_2_s_sees_pending_running_completed_and_the_results(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory({"clock": {"pending_seconds": 1.0, "running_seconds": 2.0}})
    with svc.client() as client:
        created = client.post("/api/job/batch", json=inline_body(6, failing=[3]))
        assert created.status_code == 200, created.text
        job_id = created.json()["job_id"]
        assert created.json()["status"] == "pending"
        assert created.json()["message"].endswith(f"Poll /api/job/{job_id}/status for progress.")

        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while True:  # seed 003's pollStatus, every 0.2 s instead of 2 s
            response = client.get(f"/api/job/{job_id}/status")
            assert response.status_code == 200, response.text
            status = response.json()
            assert_job_status_shape(status)
            assert status["job_id"] == job_id
            seen.append(status)
            if status["status"] == "completed":
                break
            assert status["status"] in ("pending", "running"), status
            assert time.monotonic() < deadline, f"not completed in 60 s: {status}"
            time.sleep(0.2)

        statuses = ["pending"]
        for status in seen:
            if status["status"] != statuses[-1]:
                statuses.append(status["status"])
        assert statuses == ["pending", "running", "completed"]
        steps = {status["current_step"] for status in seen}
        assert {"queued", "processing"} <= steps, steps
        # Once a job runs its progress bar only moves forward (the pending snapshot is
        # covered by test_progress_in_the_event_log_never_goes_backwards).
        progress = [s["progress"] for s in seen if s["status"] != "pending"]
        assert progress == sorted(progress), progress
        final = seen[-1]
        assert final["progress"] == 1.0 and final["error"] is None and final["attempts"] >= 1
        result = final["result"]
        assert result["results_url"] == f"/api/job/{job_id}/results"
        assert (result["requests"], result["succeeded"], result["failed"]) == (6, 5, 1)

        lines = result_lines(client, job_id)
        assert sorted(line["key"] for line in lines) == [f"k{n}" for n in range(1, 7)]
        by_key = {line["key"]: line for line in lines}
        assert "error" in by_key["k3"] and "response" in by_key["k1"]


def test_progress_in_the_event_log_never_goes_backwards(service_factory: ServiceLauncher) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    with svc.client() as client:
        job_id = create_job(client, inline_body(3))
        wait_status(client, job_id, ["completed"])
        progress = [event["data"]["progress"] for event in events_of(client, job_id)]
        assert progress == sorted(progress), progress


# -- the three ways to create a job, and the job list -------------------------------------------


def test_inline_upload_and_input_file_jobs_all_complete_and_are_listed_by_status(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    retry = {"max_attempts": 2, "retry_interval": 1, "retry_on_errors": ["RATE_LIMITED"]}
    shared = svc.data_dir / "shared"
    shared.mkdir(parents=True)
    (shared / "disk.jsonl").write_text(jsonl(request_item(f"d{n}") for n in range(1, 5)))
    with svc.client() as client:
        inline = create_job(
            client,
            inline_body(
                3, prefix="i", display_name="inline one", priority=5, metadata={"team": "a"},
                max_parallel_tasks=2, retry_config=retry,
            ),
        )  # fmt: skip
        uploaded = upload(
            client,
            "mine.jsonl",
            jsonl(request_item(f"u{n}") for n in range(1, 3)),
            {"display_name": "uploaded", "priority": -2, "metadata": {"source": "upload"}},
        )
        from_disk = create_job(client, {"input_file": "shared/disk.jsonl", "priority": 1})
        raw = client.post(
            "/api/job/batch",
            content=jsonl([request_item("r1")]),
            headers={"Content-Type": "application/jsonl"},
        )
        assert raw.status_code == 200, raw.text
        raw_body = raw.json()["job_id"]

        expected = {
            inline: ({"i1", "i2", "i3"}, "inline one", 5, {"team": "a"}),
            uploaded: ({"u1", "u2"}, "uploaded", -2, {"source": "upload"}),
            from_disk: ({"d1", "d2", "d3", "d4"}, "disk.jsonl", 1, {}),
            raw_body: ({"r1"}, None, 0, {}),
        }
        for job_id, (keys, display_name, priority, metadata) in expected.items():
            status = wait_status(client, job_id, TERMINAL)
            assert status["status"] == "completed", status
            assert status["priority"] == priority and status["metadata"] == metadata
            if display_name is not None:
                assert status["display_name"] == display_name
            assert {line["key"] for line in result_lines(client, job_id)} == keys

        assert (shared / "disk.jsonl").is_file(), "the caller's input_file is left alone"
        listed = client.get("/api/jobs", params={"status": "completed"})
        assert listed.status_code == 200, listed.text
        completed = listed.json()["jobs"]
        assert {job["job_id"] for job in completed} == set(expected)
        assert listed.json()["count"] == 4
        for job in completed:
            assert_job_status_shape(job)
        for other in ("pending", "running", "failed", "cancelled"):
            response = client.get("/api/jobs", params={"status": other})
            assert response.status_code == 200 and response.json()["jobs"] == [], other
        everything = client.get("/api/jobs").json()
        assert everything["count"] == 4
        created = [job["created_at"] for job in everything["jobs"]]
        assert created == sorted(created, reverse=True), "newest first"
        assert client.get("/api/jobs", params={"status": "done"}).status_code == 422


def test_input_file_edited_after_create_does_not_change_the_job(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG, args=["--max-live-batches", "0"])  # held
    svc.data_dir.mkdir(parents=True, exist_ok=True)
    original = svc.data_dir / "in.jsonl"
    original.write_text(jsonl([request_item("a"), request_item("b")]))
    with svc.client() as client:
        job_id = create_job(client, {"input_file": "in.jsonl"})
        assert wait_status(client, job_id, ["pending"])["status"] == "pending"
    with open(original, "w", encoding="utf-8") as handle:  # an editor saving in place
        handle.write(jsonl([request_item("z")]))
    svc.stop()
    svc.args = [a for a in svc.args if a not in ("--max-live-batches", "0")]
    svc.start()
    with svc.client() as client:
        status = wait_status(client, job_id, TERMINAL)
        assert status["status"] == "completed", status
        assert {line["key"] for line in result_lines(client, job_id)} == {"a", "b"}


# -- bad input: 4xx with a detail, never a 500, nothing left behind ------------------------------

GOOD = jsonl([request_item("a")])
NO_KEY = GOOD + json.dumps({"request": {"contents": [{"parts": [{"text": "x"}]}]}}) + "\n"
DUPLICATE = GOOD + jsonl([request_item("a")])
NOT_JSON_LINE = GOOD + '{"key": "b", "request": \n'
BIG_LINE = json.dumps(request_item("big", "x" * (2 * 1024 * 1024))) + "\n"  # 2 MB > 1 MB limit
BOUNDARY = "gembatch-test-boundary"


def _multipart(text: str) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        'filename="big.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
    )
    return head.encode() + text.encode() + f"\r\n--{BOUNDARY}--\r\n".encode()


def _chunked(data: bytes) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:  # a generator body: sent without Content-Length
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    return chunks


def _line_problem(line: int, words: str) -> Callable[[Any], bool]:
    def check(detail: Any) -> bool:
        return any(
            item["loc"] == ["input", "line", line] and words in item["msg"].lower()
            for item in detail
        )

    return check


def _loc(*loc: Any) -> Callable[[Any], bool]:
    return lambda detail: any(tuple(item["loc"][: len(loc)]) == loc for item in detail)


def _says(*words: str) -> Callable[[Any], bool]:
    return lambda detail: all(word in json.dumps(detail).lower() for word in words)


def _unknown_model(model: str, loc: tuple[str, ...] = ("body", "model")) -> Callable[[Any], bool]:
    return lambda detail: _loc(*loc)(detail) and _says(f"unknown model '{model}'", "404")(detail)


MP = "multipart/form-data; boundary=" + BOUNDARY
BAD_INPUTS: list[Any] = [
    ("upload_line_without_key", {"files": {"file": ("a.jsonl", NO_KEY)}}, 422,
     _line_problem(2, "key")),
    ("upload_duplicate_keys", {"files": {"file": ("a.jsonl", DUPLICATE)}}, 422,
     _line_problem(2, "duplicate")),
    ("upload_invalid_json_line", {"files": {"file": ("a.jsonl", NOT_JSON_LINE)}}, 422,
     _line_problem(2, "json")),
    ("upload_empty_file", {"files": {"file": ("a.jsonl", "")}}, 422, _says("empty")),
    ("upload_without_file_field", {"files": {"other": ("a.jsonl", GOOD)}}, 422,
     _loc("body", "file")),
    ("upload_options_not_json", {"files": {"file": ("a.jsonl", GOOD)},
     "data": {"options": "{nope"}}, 422, _says("options")),
    ("upload_options_unknown_field", {"files": {"file": ("a.jsonl", GOOD)},
     "data": {"options": '{"colour": "red"}'}}, 422, _loc("body", "options", "colour")),
    ("inline_request_without_contents", {"json": {"requests": [{"key": "a", "request": {}}]}},
     422, _loc("body", "requests", 0)),
    ("inline_duplicate_keys", {"json": {"requests": [request_item("a"), request_item("a")]}},
     422, _loc("body", "requests", 1)),
    ("both_requests_and_input_file", {"json": {"requests": [request_item("a")],
     "input_file": "x.jsonl"}}, 422, _says("exactly one")),
    ("neither_requests_nor_input_file", {"json": {"display_name": "x"}}, 422,
     _says("exactly one")),
    ("unknown_field", {"json": {"requests": [request_item("a")], "colour": "red"}}, 422,
     _loc("body", "colour")),
    ("retry_config_zero_attempts", {"json": {"requests": [request_item("a")],
     "retry_config": {"max_attempts": 0}}}, 422, _loc("body", "retry_config", "max_attempts")),
    ("retry_config_unknown_error_class", {"json": {"requests": [request_item("a")],
     "retry_config": {"retry_on_errors": ["SOMETIMES"]}}}, 422,
     _loc("body", "retry_config", "retry_on_errors")),
    ("retry_config_unknown_field", {"json": {"requests": [request_item("a")],
     "retry_config": {"retries": 3}}}, 422, _loc("body", "retry_config", "retries")),
    ("retry_config_negative_interval", {"json": {"requests": [request_item("a")],
     "retry_config": {"retry_interval": -1}}}, 422,
     _loc("body", "retry_config", "retry_interval")),
    ("input_file_dotdot", {"json": {"input_file": "../outside.jsonl"}}, 400,
     _says("inside", "data directory")),
    ("input_file_absolute", {"json": {"input_file": "/etc/passwd"}}, 400, _says("relative")),
    ("input_file_symlink_out", {"json": {"input_file": "link.jsonl"}}, 400,
     _says("inside", "data directory")),
    ("input_file_missing", {"json": {"input_file": "nowhere.jsonl"}}, 400,
     _says("nowhere.jsonl")),
    ("input_file_directory", {"json": {"input_file": "a-directory"}}, 400,
     _says("a-directory")),
    ("over_limit_json_with_length", {"content": json.dumps({"requests": [json.loads(BIG_LINE)]}),
     "headers": {"Content-Type": "application/json"}}, 413, _says("limit", "max-upload-mb")),
    ("over_limit_json_chunked", {"content": _chunked(json.dumps(
     {"requests": [json.loads(BIG_LINE)]}).encode()), "headers": {"Content-Type":
     "application/json"}}, 413, _says("limit")),
    ("over_limit_upload_with_length", {"content": _multipart(BIG_LINE),
     "headers": {"Content-Type": MP}}, 413, _says("limit")),
    ("over_limit_upload_chunked", {"content": _chunked(_multipart(BIG_LINE)),
     "headers": {"Content-Type": MP}}, 413, _says("limit")),
    ("over_limit_jsonl_body_chunked", {"content": _chunked(BIG_LINE.encode()),
     "headers": {"Content-Type": "application/jsonl"}}, 413, _says("limit")),
    ("not_json", {"content": b"hello, world", "headers": {"Content-Type": "application/json"}},
     400, _says("json")),
    ("json_not_an_object", {"json": [1, 2, 3]}, 422, _loc("body")),
    ("job_operations_create_without_source", {"path": "/job-operations", "json": {
     "action": "createJob", "data": {"product_id": "p1"}}}, 422, _loc("body", "data")),
    ("unknown_model_inline", {"json": {"requests": [request_item("a")],
     "model": "no-such-model"}}, 422, _unknown_model("no-such-model")),
    ("unknown_model_upload", {"files": {"file": ("a.jsonl", GOOD)},
     "data": {"options": '{"model": "no-such-model"}'}}, 422, _unknown_model("no-such-model")),
    ("unknown_model_input_file", {"json": {"input_file": "good.jsonl",
     "model": "models/nope"}}, 422, _unknown_model("models/nope")),
    ("unknown_model_job_operations", {"path": "/job-operations", "json": {"action": "createJob",
     "data": {"requests": [request_item("a")], "model": "no-such-model"}}}, 422,
     _unknown_model("no-such-model", ("body", "data", "model"))),
]  # fmt: skip


@pytest.fixture(scope="module")
def small_limit_service(module_service_factory: ServiceLauncher) -> ServiceProcess:
    """One service with a 1 MB upload limit for every bad-input case, with the files the
    input_file cases point at: `../outside.jsonl` and `link.jsonl` (a symlink out)."""
    svc = module_service_factory(FAST_EMULATOR_CONFIG, args=["--max-upload-mb", "1"])
    outside = svc.workdir / "outside.jsonl"  # `../outside.jsonl` seen from the data dir
    outside.write_text(GOOD)
    (svc.data_dir / "link.jsonl").symlink_to(outside)
    (svc.data_dir / "a-directory").mkdir()
    (svc.data_dir / "good.jsonl").write_text(GOOD)
    return svc


@pytest.mark.parametrize(("case", "request_kwargs", "code", "detail_ok"), BAD_INPUTS)
def test_bad_input_is_a_4xx_with_a_useful_detail_and_leaves_nothing_behind(
    small_limit_service: ServiceProcess,
    case: str,
    request_kwargs: dict[str, Any],
    code: int,
    detail_ok: Callable[[Any], bool],
) -> None:
    svc = small_limit_service
    kwargs = dict(request_kwargs)
    path = kwargs.pop("path", "/api/job/batch")
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()
    inputs = svc.data_dir / "inputs"
    before = set(os.listdir(inputs))
    with svc.client() as client:
        response = client.post(path, **kwargs)
        assert response.status_code == code, f"{case}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert detail, case
        assert detail_ok(detail), f"{case}: unhelpful detail {detail!r}"
        assert client.get("/api/jobs").json()["jobs"] == [], f"{case} created a job"
    assert set(os.listdir(inputs)) == before, f"{case} left files in {inputs}"


def test_a_model_is_checked_once_per_process_and_an_unknown_one_stores_nothing(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG, args=["--model", "gemini-2.5-flash"])
    emu = svc.emulator
    with svc.client() as client:
        jobs = [create_job(client, inline_body(1, prefix=f"d{n}-")) for n in range(3)]
        jobs.append(create_job(client, inline_body(1, model="gemini-2.5-pro")))
        assert emu.stats()["calls"]["models.get"] == 2  # the default once, then the other
        for _ in range(2):  # an unknown model is asked about each time (it may appear)
            refused = client.post("/api/job/batch", json=inline_body(1, model="no-such-model"))
            assert refused.status_code == 422, refused.text
            (problem,) = refused.json()["detail"]
            assert problem["loc"] == ["body", "model"]
            assert "unknown model 'no-such-model'" in problem["msg"] and "404" in problem["msg"]
        assert emu.stats()["calls"]["models.get"] == 4
        listed = client.get("/api/jobs").json()
        assert sorted(j["job_id"] for j in listed["jobs"]) == sorted(jobs)
        for job_id in jobs:
            assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
    assert emu.stats()["batches_created"] == len(jobs)


# -- DELETE and cleanup -----------------------------------------------------------------------


def _running_with_a_live_batch(client: httpx.Client, job_id: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status = client.get(f"/api/job/{job_id}/status").json()
        live = status["status"] == "running" and status["current_step"] in ("queued", "processing")
        return status if live else None

    return eventually(probe, 30, 0.1, f"job {job_id} running with a remote batch")


def test_delete_follows_seed_003_and_force_cancels_the_remote_batch_first(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG, args=["--max-live-batches", "1"])
    emu = svc.emulator
    with svc.client() as client:
        finished = create_job(client, inline_body(2, prefix="f"))
        assert wait_status(client, finished, TERMINAL)["status"] == "completed"
        emu.set_config({"clock": {"running_seconds": 3600}})  # new batches keep running
        running = create_job(client, inline_body(2, prefix="r"))
        _running_with_a_live_batch(client, running)
        pending = create_job(client, inline_body(1, prefix="p"))  # waits for the one slot
        assert client.get(f"/api/job/{pending}/status").json()["status"] == "pending"

        response = client.delete(f"/api/job/{pending}")
        assert response.status_code == 200 and response.json()["status"] == "deleted"
        gone = client.get(f"/api/job/{pending}/status")
        assert gone.status_code == 404 and gone.json() == {"detail": f"Job not found: {pending}"}

        response = client.delete(f"/api/job/{finished}")
        assert response.status_code == 200 and response.json()["status"] == "deleted"
        assert client.get(f"/api/job/{finished}/status").status_code == 404
        assert client.get(f"/api/job/{finished}/results").status_code == 404

        before = emu.stats()
        refused = client.delete(f"/api/job/{running}")
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"].startswith(SEED_003_DELETE_RUNNING)
        assert client.get(f"/api/job/{running}/status").json()["status"] == "running"
        after = emu.stats()
        for counter in ("batches_cancelled", "batches_deleted", "files_deleted"):
            assert after[counter] == before[counter], counter
        assert after["batches"] == {"ACTIVE": 1}

        forced = client.delete(f"/api/job/{running}", params={"force": "true"})
        assert forced.status_code == 200, forced.text
        eventually(
            lambda: emu.stats()["batches_cancelled"] >= before["batches_cancelled"] + 1
            and emu.stats()["files_deleted"] >= before["files_deleted"] + 1,
            30, 0.1, "the remote batch cancelled and its input file deleted",
        )  # fmt: skip
        eventually(
            lambda: client.get(f"/api/job/{running}/status").status_code == 404,
            30, 0.1, "the forced delete finished",
        )  # fmt: skip
        audit = client.get(f"/api/job/{running}/events")
        assert audit.status_code == 404


def test_a_forced_delete_goes_on_when_the_remote_cancel_fails_or_finds_nothing(
    service_factory: ServiceLauncher,
) -> None:
    # Every batches.cancel fails with 503 for a while: the forced delete is answered (the
    # job is cancelling), and the worker sends the cancel again until it goes through.
    rules = [{"endpoint": "batches.cancel", "status": 503, "first": 3}]
    config = {**FAST_EMULATOR_CONFIG, "faults": {"rules": rules}}
    svc = service_factory(config)
    emu = svc.emulator
    emu.set_config({"clock": {"running_seconds": 3600}})
    with svc.client() as client:
        failing = create_job(client, inline_body(1, prefix="x"))
        _running_with_a_live_batch(client, failing)
        forced = client.delete(f"/api/job/{failing}", params={"force": "true"})
        assert forced.status_code == 200, forced.text
        assert forced.json()["status"] == "cancelling"
        eventually(
            lambda: client.get(f"/api/job/{failing}/status").status_code == 404,
            60, 0.2, "the forced delete finished after the cancel went through",
        )  # fmt: skip
        assert emu.stats()["batches_cancelled"] == 1

        # The batch is gone remotely before gembatch cancels it (another server finished
        # the same cancel, or it was deleted by hand): nothing is left to cancel.
        gone = create_job(client, inline_body(1, prefix="g"))
        _running_with_a_live_batch(client, gone)
        sdk = emu.sdk_client()
        live = ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
        listed = sdk.batches.list(config={"page_size": 50})
        (batch,) = [b for b in listed if b.state.name in live]
        sdk.batches.cancel(name=batch.name)
        sdk.batches.delete(name=batch.name)
        forced = client.delete(f"/api/job/{gone}", params={"force": "true"})
        assert forced.status_code == 200, forced.text
        eventually(
            lambda: client.get(f"/api/job/{gone}/status").status_code == 404,
            60, 0.2, "the forced delete of a job whose batch is gone finished",
        )  # fmt: skip


def test_cleanup_deletes_finished_jobs_and_never_unfinished_ones(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG, args=["--max-live-batches", "1"])
    with svc.client() as client:
        completed = create_job(client, inline_body(1, prefix="c"))
        failed = create_job(client, inline_body(1, prefix="f", model=UNKNOWN_MODEL))
        assert wait_status(client, completed, TERMINAL)["status"] == "completed"
        assert wait_status(client, failed, TERMINAL)["status"] == "failed"
        svc.emulator.set_config({"clock": {"running_seconds": 3600}})
        running = create_job(client, inline_body(1, prefix="r"))
        _running_with_a_live_batch(client, running)
        pending = create_job(client, inline_body(1, prefix="p"))

        young = client.post("/api/job/cleanup")  # default: older than 24 h
        assert young.status_code == 200 and young.json() == {"deleted": [], "count": 0}
        response = client.post("/api/job/cleanup", params={"max_age_hours": 0})
        assert response.status_code == 200, response.text
        assert sorted(response.json()["deleted"]) == sorted([completed, failed])
        assert response.json()["count"] == 2
        for job_id in (completed, failed):
            assert client.get(f"/api/job/{job_id}/status").status_code == 404
        assert client.get(f"/api/job/{running}/status").json()["status"] == "running"
        assert client.get(f"/api/job/{pending}/status").json()["status"] == "pending"
        assert client.post("/api/job/cleanup", params={"max_age_hours": -1}).status_code == 422


# -- seed 004: /job-operations and its transitions --------------------------------------------


class TransitionLab:
    """Jobs in every state, on one emulator whose batches named `stuck` stay PENDING:
    `svc` runs jobs; `parked` (`--max-live-batches 0`) never starts one."""

    STATES = ("pending", "running", "completed", "completed_with_failures", "failed", "cancelled")

    def __init__(self, factory: ServiceLauncher) -> None:
        config = {**FAST_EMULATOR_CONFIG, "faults": {"batches": {"expire_rate": 1.0,
                  "match": STUCK}}}  # fmt: skip
        self.emulator = factory.emulator(config)
        self.svc = factory(emulator=self.emulator)
        self.parked = factory(emulator=self.emulator, args=["--max-live-batches", "0"])
        self.jobs: dict[str, tuple[ServiceProcess, str]] = {}

    def job(self, state: str) -> tuple[ServiceProcess, str]:
        """A job in `state`, reused until `spend` says a test changed it."""
        if state not in self.jobs:
            self.jobs[state] = self.make(state)
        return self.jobs[state]

    def spend(self, state: str) -> None:
        self.jobs.pop(state, None)

    def make(self, state: str) -> tuple[ServiceProcess, str]:
        if state in ("pending", "cancelled"):
            with self.parked.client() as client:
                job_id = create_job(client, inline_body(1))
                if state == "cancelled":
                    response = job_ops(client, "updateBatchJob", job_id=job_id, status="cancelled")
                    assert response.status_code == 200, response.text
                assert wait_status(client, job_id, [state])["status"] == state
            return self.parked, job_id
        with self.svc.client() as client:
            if state == "running":
                job_id = upload(client, f"{STUCK}.jsonl", jsonl([request_item("s1")]))
                _running_with_a_live_batch(client, job_id)
                return self.svc, job_id
            body = {
                "completed": inline_body(2),
                "completed_with_failures": inline_body(2, failing=[2]),
                "failed": inline_body(1, model=UNKNOWN_MODEL),
            }[state]
            job_id = create_job(client, body)
            status = wait_status(client, job_id, TERMINAL)
            assert status["status"] == public(state), status
            if state == "completed_with_failures":
                assert status["result"]["failed"] == 1
            return self.svc, job_id


def public(state: str) -> str:
    return "completed" if state == "completed_with_failures" else state


@pytest.fixture(scope="module")
def lab(module_service_factory: ServiceLauncher) -> TransitionLab:
    lab = TransitionLab(module_service_factory)
    for state in TransitionLab.STATES:  # warm up: one job in each state
        lab.job(state)
    return lab


TARGETS = ("pending", "running", "completed", "failed", "cancelled")
CANCELS = {("pending", "cancelled"), ("running", "cancelled")}
# Retry (`pending` asked of a finished job) is covered by test_retry_of_a_finished_job...
RETRIES = {(state, "pending") for state in ("completed", "completed_with_failures", "failed",
           "cancelled")}  # fmt: skip
PAIRS = [(s, t) for s in TransitionLab.STATES for t in TARGETS if (s, t) not in RETRIES]


def _visible(status: dict[str, Any]) -> tuple[Any, ...]:
    return (
        status["status"], status["current_step"], status["progress"], status["priority"],
        status["attempts"], status["requests"], status["error"], status["result"],
    )  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(pair=("pending", "cancelled"))
@example(pair=("running", "cancelled"))
@example(pair=("completed", "running"))
@given(pair=st.sampled_from(PAIRS))
def test_update_batch_job_status_follows_the_transition_table(
    lab: TransitionLab, pair: tuple[str, str]
) -> None:
    state, target = pair
    svc, job_id = lab.job(state)
    with svc.client() as client:
        before = client.get(f"/api/job/{job_id}/status").json()
        assert before["status"] == public(state), (state, before)
        audit_before = audit_of(client, job_id)
        response = job_ops(client, "updateBatchJob", job_id=job_id, status=target)

        if target == public(state):  # a no-op
            assert response.status_code == 200, response.text
            assert response.json()["status"] == public(state)
            assert audit_of(client, job_id) == audit_before
        elif pair in CANCELS:
            lab.spend(state)
            assert response.status_code == 200, response.text
            assert response.json()["status"] in ("running", "cancelled")  # cancelling: running
            assert wait_status(client, job_id, TERMINAL)["status"] == "cancelled"
            actions = [entry["action"] for entry in audit_of(client, job_id)]
            assert actions[len(audit_before) :] == ["cancel"]
        else:
            assert response.status_code == 409, response.text
            detail = response.json()["detail"]
            assert detail["code"] == "INVALID_TRANSITION"
            assert (detail["from"], detail["to"]) == (public(state), target)
            assert job_id in detail["message"]
            after = client.get(f"/api/job/{job_id}/status").json()
            assert _visible(after) == _visible(before)
            new = audit_of(client, job_id)[len(audit_before) :]
            assert [entry["action"] for entry in new] == ["transition_refused"]
            assert new[0]["detail"]["from"] == public(state)
            assert new[0]["detail"]["to"] == target


@pytest.mark.parametrize(
    ("state", "code"),
    [("failed", 200), ("cancelled", 200), ("completed_with_failures", 200), ("completed", 409)],
)
def test_retry_of_a_finished_job_reopens_it_only_when_something_failed(
    lab: TransitionLab, state: str, code: int
) -> None:
    svc, job_id = lab.job(state)
    lab.spend(state)
    with svc.client() as client:
        response = job_ops(client, "updateBatchJob", job_id=job_id, status="pending")
        assert response.status_code == code, response.text
        actions = [entry["action"] for entry in audit_of(client, job_id)]
        if code == 409:
            assert response.json()["detail"]["code"] == "INVALID_TRANSITION"
            assert actions[-1] == "transition_refused"
            assert client.get(f"/api/job/{job_id}/status").json()["status"] == "completed"
        else:
            assert actions[-1] == "retry"
            kinds = [e["type"] for e in events_of(client, job_id)]
            last_end = max(i for i, kind in enumerate(kinds) if kind in ("completed", "error"))
            reopened = events_of(client, job_id)[last_end + 1 :]
            assert reopened and reopened[0]["type"] == "status", kinds
            assert reopened[0]["data"]["status"] == "pending", reopened[0]


def test_job_operations_create_update_and_delete(lab: TransitionLab) -> None:
    with lab.svc.client() as client:
        created = job_ops(
            client,
            "createJob",
            requests=[request_item("a"), request_item("b")],
            product_id="prod-1",
            sending_group_id="group-9",
            priority=3,
            max_parallel_tasks=1,
            retry_config={"max_attempts": 4, "retry_interval": 2, "retry_on_errors": ["TIMEOUT"]},
            resource_limits={"max_memory": 2048, "max_cpu": 2},
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["job_id"]
        assert created.json()["status"] == "pending"
        assert any("max_memory" in w and "max_cpu" in w for w in created.json()["warnings"])
        status = wait_status(client, job_id, TERMINAL)
        assert status["status"] == "completed"
        assert status["metadata"] == {"product_id": "prod-1", "sending_group_id": "group-9"}
        assert status["priority"] == 3

        plain = job_ops(client, "createJob", requests=[request_item("a")])
        assert plain.status_code == 200 and plain.json()["warnings"] == []

        running = upload(client, f"{STUCK}-ops.jsonl", jsonl([request_item("s")]))
        _running_with_a_live_batch(client, running)
        raised = job_ops(client, "updateBatchJob", job_id=running, priority=42)
        assert raised.status_code == 200 and raised.json()["priority"] == 42
        assert client.get(f"/api/job/{running}/status").json()["priority"] == 42
        assert audit_of(client, running)[-1]["action"] == "priority"
        computed = job_ops(
            client, "updateBatchJob", job_id=running, detailed_status={"current_phase": "x"}
        )
        assert computed.status_code == 400 and "detailed_status" in computed.json()["detail"]

        refused = job_ops(client, "deleteJob", job_id=running)
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith(SEED_003_DELETE_RUNNING)
        assert client.get(f"/api/job/{running}/status").json()["status"] == "running"
        cancelled = job_ops(client, "updateBatchJob", job_id=running, status="cancelled")
        assert cancelled.status_code == 200, cancelled.text
        assert wait_status(client, running, TERMINAL)["status"] == "cancelled"
        deleted = job_ops(client, "deleteJob", job_id=running)
        assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
        assert client.get(f"/api/job/{running}/status").status_code == 404

        another = upload(client, f"{STUCK}-ops2.jsonl", jsonl([request_item("s")]))
        _running_with_a_live_batch(client, another)
        forced = job_ops(client, "deleteJob", job_id=another, force=True)
        assert forced.status_code == 200, forced.text
        eventually(
            lambda: client.get(f"/api/job/{another}/status").status_code == 404,
            30, 0.1, "forced deleteJob finished",
        )  # fmt: skip
        missing = job_ops(client, "deleteJob", job_id=another)
        assert missing.status_code == 404
        assert missing.json() == {"detail": f"Job not found: {another}"}

        for bad in (
            {"action": "renameJob", "data": {"job_id": job_id}},
            {"action": "updateBatchJob", "data": {"job_id": job_id, "status": "paused"}},
            {"action": "updateBatchJob", "data": {"job_id": job_id, "colour": "red"}},
            {"action": "deleteJob", "data": {}},
            {"action": "createJob"},
        ):
            response = client.post("/job-operations", json=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["detail"], bad


# -- per-user isolation -----------------------------------------------------------------------


def test_a_user_cannot_see_or_touch_another_users_jobs(service_factory: ServiceLauncher) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG, tokens=["alice", "bob"])
    alice = svc.client(token=svc.tokens["alice"])
    bob = svc.client(token=svc.tokens["bob"])
    with alice, bob:
        job_id = create_job(alice, inline_body(2))
        bobs = create_job(bob, inline_body(1, prefix="b"))
        assert wait_status(alice, job_id, TERMINAL)["status"] == "completed"
        assert wait_status(bob, bobs, TERMINAL)["status"] == "completed"
        not_found = {"detail": f"Job not found: {job_id}"}
        attempts = [
            bob.get(f"/api/job/{job_id}/status"),
            bob.get(f"/api/job/{job_id}/stream"),
            bob.get(f"/api/job/{job_id}/results"),
            bob.get(f"/api/job/{job_id}/events"),
            bob.delete(f"/api/job/{job_id}"),
            bob.delete(f"/api/job/{job_id}", params={"force": "true"}),
            job_ops(bob, "updateBatchJob", job_id=job_id, status="cancelled"),
            job_ops(bob, "updateBatchJob", job_id=job_id, priority=9),
            job_ops(bob, "deleteJob", job_id=job_id, force=True),
        ]
        for response in attempts:
            assert response.status_code == 404, (response.request.url, response.text)
            assert response.json() == not_found, response.request.url
        assert [j["job_id"] for j in bob.get("/api/jobs").json()["jobs"]] == [bobs]
        assert [j["job_id"] for j in alice.get("/api/jobs").json()["jobs"]] == [job_id]
        assert bob.post("/api/job/cleanup", params={"max_age_hours": 0}).json()["deleted"] == [bobs]
        status = alice.get(f"/api/job/{job_id}/status").json()
        assert status["status"] == "completed" and status["priority"] == 0
        assert len(result_lines(alice, job_id)) == 2

        with svc.client() as anonymous, svc.client(token="not-a-token-at-all-0000") as stranger:
            for client in (anonymous, stranger):
                for response in (
                    client.get("/api/jobs"),
                    client.get(f"/api/job/{job_id}/status"),
                    client.post("/api/job/batch", json=inline_body(1)),
                    client.delete(f"/api/job/{job_id}"),
                ):
                    assert response.status_code == 401, response.text
                    assert "token" in response.json()["detail"]
                    assert response.headers["www-authenticate"] == "Bearer"
        assert [j["job_id"] for j in alice.get("/api/jobs").json()["jobs"]] == [job_id]


# -- operators: health, metrics, audit log ----------------------------------------------------


def _gauge(text: str, sample: str) -> float:
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"{sample} not in /metrics:\n{text}")


def test_healthz_metrics_and_the_audit_log(service_factory: ServiceLauncher) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    with svc.client() as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["database"] == "ok"
        assert health.json()["worker"]["running"] is True

        done = [create_job(client, inline_body(2, prefix=f"j{n}-")) for n in range(3)]
        failed = create_job(client, inline_body(1, model=UNKNOWN_MODEL))
        for job_id in done:
            assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
        assert wait_status(client, failed, TERMINAL)["status"] == "failed"

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        completed = client.get("/api/jobs", params={"status": "completed"}).json()["count"]
        assert completed == 3
        assert _gauge(metrics.text, 'gembatch_jobs{status="completed"}') == completed
        assert _gauge(metrics.text, 'gembatch_jobs{status="failed"}') == 1
        assert _gauge(metrics.text, 'gembatch_jobs{status="running"}') == 0
        assert client.get("/healthz").json()["worker"]["cycles"] > health.json()["worker"]["cycles"]

        for job_id in [*done, failed]:
            events = events_of(client, job_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), job_id
            assert events[0]["type"] == "status" and events[0]["data"]["status"] == "pending"
            last = events[-1]
            assert last["type"] == ("error" if job_id == failed else "completed"), job_id
            for event in events:
                assert event["data"]["job_id"] == job_id
                assert event["type"] in ("status", "progress", "completed", "error")
        failure = events_of(client, failed)[-1]["data"]
        assert failure["code"] == "NOT_FOUND" and UNKNOWN_MODEL in failure["error"]
        missing = client.get("/api/job/j00000000/events")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "Job not found: j00000000"}
