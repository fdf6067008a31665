"""What the current SDK does not send, checked with raw HTTP (httpx)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from gembatch.emulator.process import EmulatorProcess

LINES = (
    b'{"key": "r1", "request": {"contents": [{"parts": [{"text": "one"}]}]}}\n'
    b'{"key": "r2", "request": {"contents": [{"parts": [{"text": "two"}]}],'
    b' "generation_config": {"temperature": 0.5}}}\n'
)


def headers(emulator: EmulatorProcess) -> dict[str, str]:
    return {"x-goog-api-key": emulator.api_key}


def upload_like_sdk_1_25(emulator: EmulatorProcess, data: bytes, chunk: int) -> dict[str, Any]:
    """google-genai 1.25: camelCase start body, always /upload/v1beta, bare chunk headers."""
    start = httpx.post(
        f"{emulator.base_url}/upload/v1beta/files",
        headers={
            **headers(emulator),
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(len(data)),
            "X-Goog-Upload-Header-Content-Type": "jsonl",
        },
        json={"file": {"displayName": "legacy.jsonl", "mimeType": "jsonl", "sizeBytes": len(data)}},
    )
    assert start.status_code == 200
    assert start.headers["x-goog-upload-status"] == "active"
    url = start.headers["x-goog-upload-url"]
    assert url.startswith(emulator.base_url + "/upload/v1beta/files?upload_id=")
    offset = 0
    while True:
        piece = data[offset : offset + chunk]
        last = offset + len(piece) >= len(data)
        response = httpx.post(
            url,
            headers={
                "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                "X-Goog-Upload-Offset": str(offset),
            },
            content=piece,
        )
        assert response.status_code == 200
        offset += len(piece)
        if last:
            assert response.headers["x-goog-upload-status"] == "final"
            return response.json()["file"]
        assert response.headers["x-goog-upload-status"] == "active"


def test_camel_case_upload_body_as_sdk_1_25_sends_it(emulator: EmulatorProcess) -> None:
    file = upload_like_sdk_1_25(emulator, LINES, chunk=40)
    assert file["displayName"] == "legacy.jsonl"
    assert file["mimeType"] == "jsonl"
    assert file["sizeBytes"] == str(len(LINES))  # int64 as a string
    assert file["state"] == "ACTIVE"
    assert file["createTime"].endswith("Z") and len(file["createTime"].split(".")[1]) == 10


def test_upload_query_reports_received_bytes_and_offset_mismatch_is_refused(
    emulator: EmulatorProcess,
) -> None:
    start = httpx.post(
        f"{emulator.base_url}/upload/v1/files",
        headers={
            **headers(emulator),
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": "10",
        },
        json={"file": {"display_name": "q"}},
    )
    url = start.headers["x-goog-upload-url"]
    httpx.post(
        url,
        headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"},
        content=b"12345",
    )
    query = httpx.post(url, headers={"X-Goog-Upload-Command": "query"})
    assert query.headers["x-goog-upload-size-received"] == "5"
    wrong = httpx.post(
        url,
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "3"},
        content=b"67890",
    )
    assert wrong.status_code == 400
    assert wrong.headers["x-goog-upload-status"] == "final"
    done = httpx.post(
        url,
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "5"},
        content=b"67890",
    )
    assert done.json()["file"]["sizeBytes"] == "10"


def test_v1alpha_routes_and_snake_case_create_body(emulator: EmulatorProcess) -> None:
    file = upload_like_sdk_1_25(emulator, LINES, chunk=1 << 20)
    file_id = file["name"].removeprefix("files/")
    got = httpx.get(f"{emulator.base_url}/v1alpha/files/{file_id}", headers=headers(emulator))
    assert got.status_code == 200 and got.json()["name"] == file["name"]

    created = httpx.post(
        f"{emulator.base_url}/v1alpha/models/gemini-2.5-flash:batchGenerateContent",
        headers=headers(emulator),
        json={"batch": {"display_name": "snake", "input_config": {"file_name": file["name"]}}},
    )
    assert created.status_code == 200
    operation = created.json()
    assert operation["metadata"]["displayName"] == "snake"
    assert operation["metadata"]["inputConfig"] == {"fileName": file["name"]}
    assert operation["metadata"]["@type"].endswith("GenerateContentBatch")
    name = operation["name"]

    deadline = time.monotonic() + 20
    while True:
        body = httpx.get(f"{emulator.base_url}/v1alpha/{name}", headers=headers(emulator)).json()
        if body["metadata"]["state"] == "BATCH_STATE_SUCCEEDED":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    output = body["metadata"]["output"]["responsesFile"]
    assert output == "files/batch-" + name.removeprefix("batches/")

    listed = httpx.get(
        f"{emulator.base_url}/v1alpha/batches",
        params={"pageSize": 10},
        headers=headers(emulator),
    ).json()
    assert [op["name"] for op in listed["operations"]] == [name]

    both = [
        httpx.get(
            f"{emulator.base_url}/v1alpha/{output}:download",
            params={"alt": "media"},
            headers=headers(emulator),
        ),
        httpx.get(
            f"{emulator.base_url}/download/v1beta/{output}:download",
            params={"alt": "media"},
            headers=headers(emulator),
        ),
    ]
    assert all(r.status_code == 200 for r in both)
    assert both[0].content == both[1].content
    keys = sorted(json.loads(line)["key"] for line in both[0].text.splitlines())
    assert keys == ["r1", "r2"]

    cancel = httpx.post(f"{emulator.base_url}/v1alpha/{name}:cancel", headers=headers(emulator))
    assert cancel.status_code == 200 and cancel.json() == {}
    deleted = httpx.delete(f"{emulator.base_url}/v1alpha/{name}", headers=headers(emulator))
    assert deleted.status_code == 200 and deleted.json() == {}


def test_duplicate_slashes_and_a_path_prefix_are_accepted(emulator: EmulatorProcess) -> None:
    for path in ("//v1beta//files", "/some/prefix/v1beta/files"):
        response = httpx.get(emulator.base_url + path, headers=headers(emulator))
        assert response.status_code == 200, path


def test_unknown_route_is_a_404_envelope(emulator: EmulatorProcess) -> None:
    response = httpx.get(f"{emulator.base_url}/v1beta/nothing-here", headers=headers(emulator))
    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"
