"""What the service's schema promises clients, and where its 422s point.

The OpenAPI document a client generator reads (the multipart `options` it documents, the
links from a created job to what comes next), and problem locations that name the field
of the body as it was sent: `/job-operations` wraps the create body in `data`.
Built in-process from `create_app` (no Gemini: every case is refused before a call).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gembatch.server.app import CREATE_BODY_DOC, create_app
from gembatch.server.models import JobOptions
from gembatch.server.settings import ServerSettings
from tests.server.conftest import inline_body, request_item


def _app(tmp_path: Path) -> Any:
    settings = ServerSettings(db_url=f"sqlite:///{tmp_path / 'api.db'}", data_dir=tmp_path)
    return create_app(settings, remote=object())


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # No `with`: the lifespan (worker, event hub) is not started; creates that are
    # refused never reach them.
    # Addressed to 127.0.0.1: without tokens the service answers no other Host.
    yield TestClient(_app(tmp_path), base_url="http://127.0.0.1")


def test_the_multipart_options_description_lists_every_job_option() -> None:
    multipart = CREATE_BODY_DOC["requestBody"]["content"]["multipart/form-data"]
    description = multipart["schema"]["properties"]["options"]["description"]
    missing = [name for name in JobOptions.model_fields if name not in description]
    assert missing == [], description
    assert "max_task_requests" in description and "max_task_bytes" in description


def test_a_created_job_links_to_its_status_events_results_stream_and_delete(
    tmp_path: Path,
) -> None:
    schema = _app(tmp_path).openapi()
    by_id = {
        operation["operationId"]: (method, path, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }
    created = schema["paths"]["/api/job/batch"]["post"]["responses"]["200"]
    links = created["links"]
    targets = {}
    for name, link in links.items():
        assert link["operationId"] in by_id, f"{name}: no operation {link['operationId']!r}"
        method, path, operation = by_id[link["operationId"]]
        targets[(method, path)] = name
        assert link["parameters"] == {"job_id": "$response.body#/job_id"}
        path_params = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert path_params == {"job_id"}, (name, path_params)
    assert set(targets) == {
        ("get", "/api/job/{job_id}/status"),
        ("get", "/api/job/{job_id}/events"),
        ("get", "/api/job/{job_id}/results"),
        ("get", "/api/job/{job_id}/stream"),
        ("delete", "/api/job/{job_id}"),
    }
    # `$response.body#/job_id` points at a field the 200 body has.
    ref = created["content"]["application/json"]["schema"]["$ref"]
    response_schema = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "job_id" in response_schema["properties"]
    assert "job_id" in response_schema.get("required", [])


BAD_CREATES: list[Any] = [
    ("request_without_contents", {"requests": [request_item("a"), {"key": "b", "request": {}}]},
     ["requests", 1]),
    ("duplicate_keys", {"requests": [request_item("a"), request_item("a")]}, ["requests", 1]),
    ("task_bytes_smaller_than_a_line", {**inline_body(2), "max_task_bytes": 20},
     ["max_task_bytes"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "loc"), BAD_CREATES)
def test_create_problems_name_the_field_as_sent_on_both_endpoints(
    client: TestClient, case: str, body: dict[str, Any], loc: list[Any]
) -> None:
    direct = client.post("/api/job/batch", json=body)
    assert direct.status_code == 422, direct.text
    assert loc in [item["loc"][1:] for item in direct.json()["detail"]], direct.json()
    assert all(item["loc"][:1] in (["body"], ["input"]) for item in direct.json()["detail"])

    operation = client.post("/job-operations", json={"action": "createJob", "data": body})
    assert operation.status_code == 422, operation.text
    detail = operation.json()["detail"]
    assert ["body", "data", *loc] in [item["loc"] for item in detail], detail
    # Every body location is under `data`; the messages are the same as the direct create's.
    assert all(item["loc"][:2] == ["body", "data"] for item in detail if item["loc"][0] == "body")
    assert sorted(i["msg"] for i in detail) == sorted(i["msg"] for i in direct.json()["detail"])


def test_a_create_job_validation_error_is_still_under_data_once(client: TestClient) -> None:
    # Refused by the model of `data` (before the service): one `data`, not two.
    response = client.post(
        "/job-operations", json={"action": "createJob", "data": {**inline_body(1), "colour": 1}}
    )
    assert response.status_code == 422, response.text
    assert [item["loc"] for item in response.json()["detail"]] == [["body", "data", "colour"]]
