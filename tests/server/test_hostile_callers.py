"""Callers the service must not obey: a web page the user visits that makes their browser
write to the service (a text/plain or url-encoded body needs no CORS preflight, a
multipart one neither, and a browser always says where it comes from in `Origin` or
`Sec-Fetch-Site`), a page that re-points its own host name at 127.0.0.1 (DNS rebinding:
its requests carry its name as Host), and tokens in URLs, which leak into logs and
history (only the GET stream takes one: EventSource cannot send headers).

Real `gembatch serve` processes on real emulators, one without tokens and one with two
users, shared by the module; requests are sent exactly as a browser would send them.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    create_job,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)

ALICE = "alice-hostile-token-0123456789"


@pytest.fixture(scope="module")
def local(module_service_factory: ServiceLauncher) -> ServiceProcess:
    """Without tokens: one local user, on 127.0.0.1."""
    return module_service_factory(FAST_EMULATOR_CONFIG)


@pytest.fixture(scope="module")
def shared(module_service_factory: ServiceLauncher) -> ServiceProcess:
    """With tokens (listening on every interface, as behind a load balancer)."""
    return module_service_factory(
        FAST_EMULATOR_CONFIG, tokens={"alice": ALICE}, args=["--host", "0.0.0.0"]
    )


def _jobs(client: httpx.Client) -> list[str]:
    response = client.get("/api/jobs")
    assert response.status_code == 200, response.text
    return [job["job_id"] for job in response.json()["jobs"]]


def _inputs(svc: ServiceProcess) -> set[str]:
    return {path.name for path in (svc.data_dir / "inputs").iterdir()}


def test_writes_a_foreign_page_can_send_are_refused_and_the_pages_own_still_work(
    local: ServiceProcess,
) -> None:
    own = f"http://127.0.0.1:{local.port}"
    body = json.dumps(inline_body(1, prefix="x"))
    lines = jsonl([request_item("x1")])
    evil = {"Origin": "http://evil.example"}
    refused: list[tuple[str, str, dict[str, Any], int, str]] = [
        # (what, path, request, status, a word of the detail)
        ("a text/plain body (no preflight)", "/api/job/batch",
         {"content": body, "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ("a url-encoded form", "/api/job/batch", {"content": "requests=1",
         "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
         "application/x-www-form-urlencoded"),
        ("a body without a Content-Type", "/api/job/batch", {"content": body.encode()}, 415,
         "without a Content-Type"),
        ("text/plain to the create stream", "/api/job/batch/stream",
         {"content": body, "headers": {"Content-Type": "text/plain"}}, 415, "text/plain"),
        ("text/plain to /job-operations", "/job-operations",
         {"content": json.dumps({"action": "createJob", "data": json.loads(body)}),
          "headers": {"Content-Type": "text/plain;charset=UTF-8"}}, 415, "text/plain"),
        ("a foreign Origin", "/api/job/batch", {"content": body, "headers": {
         "Content-Type": "application/json", **evil}}, 403, "evil.example"),
        ("a multipart upload from a foreign page (no preflight either)", "/api/job/batch",
         {"files": {"file": ("x.jsonl", lines)}, "headers": evil}, 403, "evil.example"),
        ("the null Origin (sandboxed frames, data: URLs)", "/api/job/batch",
         {"files": {"file": ("x.jsonl", lines)}, "headers": {"Origin": "null"}}, 403, "null"),
        ("another port of this host", "/api/job/batch", {"files": {"file": ("x.jsonl", lines)},
         "headers": {"Origin": f"http://127.0.0.1:{local.port + 1}"}}, 403, "Origin"),
        ("a browser saying cross-site", "/api/job/batch", {"files": {"file": ("x.jsonl", lines)},
         "headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "cross-site"),
        ("a browser saying same-site (another origin of the site)", "/api/job/batch",
         {"files": {"file": ("x.jsonl", lines)}, "headers": {"Sec-Fetch-Site": "same-site",
          "Origin": own}}, 403, "same-site"),
    ]  # fmt: skip
    with local.client() as client:
        before, files = _jobs(client), _inputs(local)
        for what, path, request, status, word in refused:
            response = client.post(path, **request)
            assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
            assert word in response.json()["detail"], (what, response.text)
        assert _jobs(client) == before, "a refused write created a job"
        assert _inputs(local) == files, "a refused write left a file"

        job_id = create_job(client, inline_body(1, prefix="kept"))  # curl: no Origin at all
        assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
        for method, path in (("DELETE", f"/api/job/{job_id}"), ("POST", "/api/job/cleanup")):
            response = client.request(method, path, params={"max_age_hours": 0}, headers=evil)
            assert response.status_code == 403, (method, path, response.text)
        assert job_id in _jobs(client), "a cross-site delete or cleanup removed the job"

        # The page's own requests: same Origin (Sec-Fetch-Site: same-origin), any body type.
        page = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
        created = [
            client.post("/api/job/batch", json=inline_body(1, prefix="p"), headers=page),
            client.post("/api/job/batch", files={"file": ("p.jsonl", lines)}, headers=page),
            client.post("/api/job/batch", content=lines,
                        headers={"Content-Type": "application/jsonl", "Origin": own}),
        ]  # fmt: skip
        for response in created:
            assert response.status_code == 200, response.text
        gone = client.delete(f"/api/job/{job_id}", headers=page)
        assert gone.status_code == 200, gone.text
        # Bodiless writes need no Content-Type (curl -X POST).
        assert client.post("/api/job/cleanup", params={"max_age_hours": 1000}).status_code == 200


FOREIGN_HOSTS = [
    "evil.example",
    "rebound.attacker.test:{port}",
    "192.168.1.20:{port}",
    "localhost.attacker.test",
    "",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_without_tokens_a_host_name_other_than_loopback_gets_421(
    local: ServiceProcess, host: str
) -> None:
    """A page whose name now points at 127.0.0.1 sends its own name as Host: no answer,
    not even the page or the job list (a rebinding page could read them)."""
    host = host.format(port=local.port)
    with local.client() as client:
        for method, path in (("GET", "/api/jobs"), ("GET", "/"), ("POST", "/api/job/batch")):
            response = client.request(
                method, path, headers={"Host": host}, json=inline_body(1, prefix="h")
            )
            assert response.status_code == 421, (host, path, response.text)
            assert "127.0.0.1" in response.json()["detail"], response.text
        for name in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST"):  # the loopback names
            for shown in (name, f"{name}:{local.port}"):
                response = client.get("/api/jobs", headers={"Host": shown})
                assert response.status_code == 200, (shown, response.text)


def test_with_tokens_a_cross_site_write_is_refused_and_any_host_name_is_served(
    shared: ServiceProcess,
) -> None:
    with shared.client(ALICE) as alice:
        for origin in ("http://evil.example", "null"):
            response = alice.post(
                "/api/job/batch", json=inline_body(1, prefix="t"), headers={"Origin": origin}
            )
            assert response.status_code == 403, (origin, response.text)
        assert _jobs(alice) == []
        # Behind a load balancer the service has many names; tokens guard it, not Host.
        named = {"Host": "gembatch.example.com", "Origin": "https://gembatch.example.com"}
        response = alice.post("/api/job/batch", json=inline_body(1, prefix="lb"), headers=named)
        assert response.status_code == 200, response.text


def test_a_token_in_the_url_is_accepted_only_on_the_get_stream(shared: ServiceProcess) -> None:
    with shared.client(ALICE) as alice, shared.client() as anonymous:
        job_id = create_job(alice, inline_body(1, prefix="u"))
        assert wait_status(alice, job_id, TERMINAL)["status"] == "completed"
        query = {"access_token": ALICE}
        for method, path in (
            ("GET", "/api/jobs"),
            ("GET", f"/api/job/{job_id}/status"),
            ("GET", f"/api/job/{job_id}/results"),
            ("GET", f"/api/job/{job_id}/events"),
            ("POST", "/api/job/batch"),
            ("POST", "/api/job/cleanup"),
            ("DELETE", f"/api/job/{job_id}"),
        ):
            body = inline_body(1, prefix="q") if method == "POST" else None
            response = anonymous.request(method, path, params=query, json=body)
            assert response.status_code == 401, (method, path, response.text)
            assert "only on GET /api/job/{id}/stream" in response.json()["detail"]
        assert alice.get(f"/api/job/{job_id}/status").json()["status"] == "completed"

        # EventSource's way: the stream takes the token from the URL.
        with connect_sse(anonymous, "GET", f"/api/job/{job_id}/stream", params=query) as source:
            assert source.response.status_code == 200
            events = [event.event for event in source.iter_sse()]
        assert events[0] == "status" and events[-1] == "completed", events
        # The scheme name is case-insensitive (RFC 9110).
        lower = anonymous.get("/api/jobs", headers={"Authorization": f"bearer {ALICE}"})
        assert lower.status_code == 200 and job_id in [j["job_id"] for j in lower.json()["jobs"]]
