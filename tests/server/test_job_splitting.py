"""Splitting a service job into several tasks (`max_task_requests`, `max_task_bytes`), and
the per-job limits that only mean something then: `max_parallel_tasks` and seed 004's
`resource_limits` (`max_requests_in_flight`, `max_tokens_in_flight`).

Every test drives a real `gembatch serve` on a real emulator process. While the jobs run, a
thread lists the emulator's batches (its REST API, as Google's) and records, per job, the
request counts of the batches still pending or running; display names carry the job id.
The assertions are on those samples and on the results: never on how long anything took.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    TERMINAL,
    ServiceLauncher,
    create_job,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)
from tests.server.reliability_helpers import creates_of

# Batches live long enough to be seen together; the service polls every 0.2 s.
CLOCK = {"clock": {"pending_seconds": 0.2, "running_seconds": 1.0}}
LIVE = ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
DISPLAY = re.compile(r"-(j[0-9a-f]+)-t\d+a\d+$")


class RemoteSampler:
    """Lists the emulator's batches every `interval` seconds in a thread. `samples` holds,
    per listing, job id -> the request counts of that job's live (pending or running)
    batches."""

    def __init__(self, emu: EmulatorProcess, interval: float = 0.05) -> None:
        self.emu = emu
        self.interval = interval
        self.samples: list[dict[str, list[int]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RemoteSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        headers = {"x-goog-api-key": self.emu.api_key}
        with httpx.Client(base_url=self.emu.base_url, headers=headers, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    self.samples.append(_live_by_job(client))
                except Exception as exc:  # a slow listing is not a failure of the service
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.interval)

    def batches(self, job_id: str) -> list[int]:
        """How many of the job's batches were live, listing by listing."""
        return [len(sample.get(job_id, [])) for sample in self.samples]

    def requests(self, job_id: str) -> list[int]:
        """How many of the job's requests were in live batches, listing by listing."""
        return [sum(sample.get(job_id, [])) for sample in self.samples]


def _live_by_job(client: httpx.Client) -> dict[str, list[int]]:
    live: dict[str, list[int]] = {}
    token = None
    while True:
        params = {"pageSize": "100", **({"pageToken": token} if token else {})}
        page = client.get("/v1beta/batches", params=params)
        page.raise_for_status()
        body = page.json()
        for operation in body.get("operations", []):
            meta = operation.get("metadata", {})
            found = DISPLAY.search(meta.get("displayName", ""))
            if found and meta.get("state") in LIVE:
                count = int(meta.get("batchStats", {}).get("requestCount", 0))
                live.setdefault(found[1], []).append(count)
        token = body.get("nextPageToken")
        if not token:
            return live


def _result_keys(client: httpx.Client, job_id: str) -> list[str]:
    response = client.get(f"/api/job/{job_id}/results")
    assert response.status_code == 200, response.text
    return [json.loads(line)["key"] for line in response.text.splitlines() if line.strip()]


def _upload(client: httpx.Client, text: str, options: dict[str, Any]) -> str:
    response = client.post(
        "/api/job/batch",
        files={"file": ("split.jsonl", text)},
        data={"options": json.dumps(options)},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def _same_size_lines(count: int, prefix: str) -> tuple[str, int]:
    """A JSONL file of `count` requests whose lines all have the same length; and that
    length in bytes (newline included)."""
    lines = [json.dumps(request_item(f"{prefix}{n:03d}", f"prompt {n:03d}")) + "\n" for n in
             range(1, count + 1)]  # fmt: skip
    assert len({len(line.encode()) for line in lines}) == 1
    return "".join(lines), len(lines[0].encode())


# -- max_parallel_tasks --------------------------------------------------------------------


def test_max_parallel_tasks_bounds_the_live_batches_of_a_split_job(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(CLOCK)  # the global limit (10) would allow every task at once
    by_bytes, line_bytes = _same_size_lines(6, "b")
    with RemoteSampler(svc.emulator) as sampler, svc.client() as client:
        ten = create_job(client, inline_body(20, prefix="r", max_task_requests=2,
                                             max_parallel_tasks=2))  # fmt: skip
        # Two lines per task by size: three tasks, one at a time; through a multipart upload.
        three = _upload(
            client, by_bytes, {"max_task_bytes": 2 * line_bytes + 1, "max_parallel_tasks": 1}
        )
        for job_id in (ten, three):
            assert wait_status(client, job_id, TERMINAL, timeout=90)["status"] == "completed"
        ten_keys, three_keys = _result_keys(client, ten), _result_keys(client, three)
    assert sampler.samples, sampler.errors
    assert sorted(ten_keys) == sorted(f"r{n}" for n in range(1, 21))
    assert sorted(three_keys) == sorted(f"b{n:03d}" for n in range(1, 7))
    emu = svc.emulator
    for job_id, tasks in ((ten, 10), (three, 3)):
        created = creates_of(emu, job_id)
        assert len(created) == tasks and set(created.values()) == {1}, created
    assert max(sampler.batches(ten)) <= 2, sampler.batches(ten)
    assert max(sampler.batches(three)) <= 1, sampler.batches(three)
    # The limit was reached, not merely respected by tasks that happened to run one by one.
    assert max(sampler.batches(ten)) == 2, sampler.batches(ten)
    assert max(sampler.requests(ten)) == 4  # two tasks of two requests


# -- resource_limits -----------------------------------------------------------------------


def test_resource_limits_bound_the_requests_and_tokens_in_flight(
    service_factory: ServiceLauncher,
) -> None:
    svc = service_factory(CLOCK)
    text, line_bytes = _same_size_lines(12, "t")
    task_tokens = 3 * line_bytes // 4  # the engine's estimate: bytes / 4
    with RemoteSampler(svc.emulator) as sampler, svc.client() as client:
        # Seed 004's createJob: twelve requests, four tasks of three, at most six in flight.
        created = client.post(
            "/job-operations",
            json={
                "action": "createJob",
                "data": {
                    **inline_body(12, prefix="q", max_task_requests=3),
                    "resource_limits": {"max_requests_in_flight": 6},
                },
            },
        )
        assert created.status_code == 200, created.text
        by_requests = created.json()["job_id"]
        # Tokens: two tasks' worth of estimated tokens in flight, never three.
        by_tokens = _upload(
            client,
            text,
            {"max_task_requests": 3, "resource_limits": {"max_tokens_in_flight": 2 * task_tokens}},
        )
        for job_id in (by_requests, by_tokens):
            assert wait_status(client, job_id, TERMINAL, timeout=90)["status"] == "completed"
        request_keys = _result_keys(client, by_requests)
        token_keys = _result_keys(client, by_tokens)
    assert sampler.samples, sampler.errors
    assert sorted(request_keys) == sorted(f"q{n}" for n in range(1, 13))
    assert sorted(token_keys) == sorted(f"t{n:03d}" for n in range(1, 13))
    for job_id in (by_requests, by_tokens):
        created_batches = creates_of(svc.emulator, job_id)
        assert len(created_batches) == 4 and set(created_batches.values()) == {1}
    assert max(sampler.requests(by_requests)) <= 6, sampler.requests(by_requests)
    assert max(sampler.batches(by_tokens)) <= 2, sampler.batches(by_tokens)
    # Both limits were reached: two tasks in flight at once, never a third.
    assert max(sampler.requests(by_requests)) == 6, sampler.requests(by_requests)
    assert max(sampler.batches(by_tokens)) == 2, sampler.batches(by_tokens)


# -- bad split options: 422 that names the field, nothing created -----------------------------

SMALL = inline_body(3, prefix="s")
BAD_SPLITS: list[Any] = [
    ("requests_zero", {"json": {**SMALL, "max_task_requests": 0}}, ("body", "max_task_requests"),
     "greater than or equal to 1"),
    ("bytes_not_a_number", {"json": {**SMALL, "max_task_bytes": "big"}},
     ("body", "max_task_bytes"), "integer"),
    ("bytes_over_gemini_limit", {"json": {**SMALL, "max_task_bytes": 3 * 1024**3}},
     ("body", "max_task_bytes"), "less than or equal to"),
    ("bytes_smaller_than_a_line", {"json": {**SMALL, "max_task_bytes": 20}},
     ("body", "max_task_bytes"), "smaller than a line"),
    ("too_many_tasks", {"json": {**inline_body(1001), "max_task_requests": 1}},
     ("body", "max_task_requests"), "1001 tasks"),
    ("upload_options", {"files": {"file": ("a.jsonl", jsonl([request_item("a")]))},
     "data": {"options": json.dumps({"max_task_requests": -3})}},
     ("body", "options", "max_task_requests"), "greater than or equal to 1"),
    ("job_operations", {"path": "/job-operations", "json": {"action": "createJob",
     "data": {**SMALL, "max_task_bytes": 0}}}, ("body", "data", "max_task_bytes"),
     "greater than or equal to 1"),
]  # fmt: skip


@pytest.fixture(scope="module")
def split_service(module_service_factory: ServiceLauncher) -> Iterator[ServiceProcess]:
    yield module_service_factory(CLOCK)


@pytest.mark.parametrize(("case", "request_kwargs", "loc", "words"), BAD_SPLITS)
def test_bad_split_options_are_a_422_naming_the_field(
    split_service: ServiceProcess,
    case: str,
    request_kwargs: dict[str, Any],
    loc: tuple[str, ...],
    words: str,
) -> None:
    kwargs = dict(request_kwargs)
    path = kwargs.pop("path", "/api/job/batch")
    inputs = split_service.data_dir / "inputs"
    before = set(inputs.iterdir())
    with split_service.client() as client:
        response = client.post(path, **kwargs)
        assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        named = [item for item in detail if tuple(item["loc"][: len(loc)]) == loc]
        assert named, f"{case}: no problem at {loc}: {detail}"
        assert any(words in item["msg"] for item in named), f"{case}: {detail}"
        assert client.get("/api/jobs").json()["jobs"] == [], f"{case} created a job"
    assert set(inputs.iterdir()) == before, f"{case} left files behind"
