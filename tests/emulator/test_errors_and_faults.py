"""Google's errors and injected faults surface through the SDK with the right codes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from gembatch.emulator.process import EmulatorProcess
from tests.conftest import write_requests


def upload(client: Any, tmp_path: Path, text: str, name: str = "in.jsonl") -> Any:
    path = tmp_path / name
    path.write_text(text)
    return client.files.upload(file=path, config={"mime_type": "jsonl"})


def test_missing_api_key_is_403_permission_denied(emulator: EmulatorProcess) -> None:
    response = httpx.get(f"{emulator.base_url}/v1beta/files")
    assert response.status_code == 403
    assert response.json()["error"]["status"] == "PERMISSION_DENIED"


def test_bad_api_key_is_400_invalid_argument(emulator_factory: Any) -> None:
    emulator = emulator_factory({"auth": {"api_keys": ["the-good-key"]}})
    client = genai.Client(
        api_key="a-bad-key", http_options=types.HttpOptions(base_url=emulator.base_url)
    )
    with pytest.raises(errors.ClientError) as caught:
        list(client.files.list())
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert "API key not valid" in caught.value.message
    good = genai.Client(
        api_key="the-good-key", http_options=types.HttpOptions(base_url=emulator.base_url)
    )
    assert list(good.files.list()) == []
    # the key is also accepted as ?key=
    ok = httpx.get(f"{emulator.base_url}/v1beta/files", params={"key": "the-good-key"})
    assert ok.status_code == 200


def test_create_from_a_missing_file_is_403(emulator: EmulatorProcess) -> None:
    client = emulator.sdk_client()
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="gemini-2.5-flash", src="files/doesnotexist")
    assert caught.value.code == 403
    assert caught.value.status == "PERMISSION_DENIED"
    assert "doesnotexist" in caught.value.message


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"key": "a", "request": {}}\nnot json\n', "line 2"),
        ("", "no requests"),
        ('["a list"]\n', "not a JSON object"),
    ],
)
def test_create_from_a_bad_input_file_is_400(
    emulator: EmulatorProcess, tmp_path: Path, content: str, fragment: str
) -> None:
    client = emulator.sdk_client()
    uploaded = upload(client, tmp_path, content)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"
    assert fragment in caught.value.message
    assert emulator.stats()["batches_created"] == 0


def test_non_utf8_input_file_is_400(emulator: EmulatorProcess, tmp_path: Path) -> None:
    client = emulator.sdk_client()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"key": "é", "request": {}}\n'.encode("latin-1"))
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    assert caught.value.code == 400
    assert "UTF-8" in caught.value.message


def test_unknown_batch_is_404(emulator: EmulatorProcess) -> None:
    with pytest.raises(errors.ClientError) as caught:
        client = emulator.sdk_client()
        client.batches.get(name="batches/nope")
    assert caught.value.code == 404
    assert caught.value.status == "NOT_FOUND"


def test_unknown_model_is_404(emulator: EmulatorProcess, tmp_path: Path) -> None:
    client = emulator.sdk_client()
    uploaded = upload(client, tmp_path, '{"key": "a", "request": {"contents": []}}\n')
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="not-a-model", src=uploaded.name)
    assert caught.value.code == 404
    assert "models/not-a-model is not found" in caught.value.message


def test_unknown_field_in_an_inline_request_is_400(emulator: EmulatorProcess) -> None:
    # google-genai 1.25 put systemInstruction beside `request`; the real server rejects it.
    body = {
        "batch": {
            "inputConfig": {
                "requests": {
                    "requests": [
                        {
                            "request": {"contents": [{"parts": [{"text": "x"}]}]},
                            "systemInstruction": {"parts": [{"text": "be brief"}]},
                        }
                    ]
                }
            }
        }
    }
    response = httpx.post(
        f"{emulator.base_url}/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        json=body,
        headers={"x-goog-api-key": emulator.api_key},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert 'Unknown name "systemInstruction"' in error["message"]
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"


def test_429_storm_on_create_surfaces_as_client_error_with_retry_after(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {
            "faults": {
                "rules": [
                    {
                        "endpoint": "batches.create",
                        "status": 429,
                        "first": 2,
                        "retry_after_seconds": 3,
                    }
                ]
            }
        }
    )
    client = emulator.sdk_client()
    uploaded = upload(client, tmp_path, '{"key": "a", "request": {"contents": []}}\n')
    for _ in range(2):
        with pytest.raises(errors.ClientError) as caught:
            client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
        assert caught.value.code == 429
        assert caught.value.status == "RESOURCE_EXHAUSTED"
        assert caught.value.response.headers["retry-after"] == "3"
    assert client.batches.create(model="gemini-2.5-flash", src=uploaded.name).name
    stats = emulator.stats()
    assert stats["faults"] == {"batches.create": 2}
    assert stats["batches_created"] == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_surface_as_server_error(emulator_factory: Any, status: int) -> None:
    emulator = emulator_factory(
        {"faults": {"rules": [{"endpoint": "files.list", "status": status}]}}
    )
    with pytest.raises(errors.ServerError) as caught:
        client = emulator.sdk_client()
        list(client.files.list())
    assert caught.value.code == status


def test_fault_rates_are_deterministic_under_a_seed(emulator_factory: Any) -> None:
    config = {"seed": 7, "faults": {"rules": [{"endpoint": "files.*", "status": 503, "rate": 0.5}]}}
    outcomes = []
    for _ in range(2):
        emulator = emulator_factory(config)
        url = f"{emulator.base_url}/v1beta/files"
        headers = {"x-goog-api-key": emulator.api_key}
        outcomes.append([httpx.get(url, headers=headers).status_code for _ in range(30)])
        emulator.close()
    assert outcomes[0] == outcomes[1]
    assert 5 < outcomes[0].count(503) < 25


def test_injected_latency_delays_calls(emulator_factory: Any) -> None:
    emulator = emulator_factory(
        {"faults": {"rules": [{"endpoint": "files.list", "latency_ms": 400}]}}
    )
    client = emulator.sdk_client()
    started = time.monotonic()
    list(client.files.list())
    assert time.monotonic() - started >= 0.35


def test_upload_chunk_fault_is_a_clean_sdk_error(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {"faults": {"rules": [{"endpoint": "files.upload_chunk", "status": 503, "first": 1}]}}
    )
    path = tmp_path / "f.txt"
    path.write_text("data")
    client = emulator.sdk_client()
    with pytest.raises(errors.ServerError) as caught:
        client.files.upload(file=path, config={"mime_type": "text/plain"})
    assert caught.value.code == 503
    assert client.files.upload(file=path, config={"mime_type": "text/plain"}).size_bytes == 4


def _finished_output(emulator: EmulatorProcess, tmp_path: Path, n: int = 50) -> Any:
    client = emulator.sdk_client()
    path = write_requests(tmp_path / "t.jsonl", [f"prompt {i}" for i in range(n)])
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    batch = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    deadline = time.monotonic() + 20
    while client.batches.get(name=batch.name).state.name != "JOB_STATE_SUCCEEDED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return client, client.batches.get(name=batch.name).dest.file_name


def test_truncated_download_aborts_the_connection(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.1, "running_seconds": 0.2},
            "faults": {"downloads": {"truncate_first": 1, "mode": "abort"}},
        }
    )
    client, output = _finished_output(emulator, tmp_path)
    with pytest.raises(Exception) as caught:
        client.files.download(file=output)
    assert not isinstance(caught.value, errors.APIError)  # a transport error, not an API answer
    full = client.files.download(file=output)  # the next download is whole
    assert len(full.decode().splitlines()) == 50
    assert emulator.stats()["downloads_truncated"] == 1


def test_silently_truncated_download_is_shorter_but_well_formed(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.1, "running_seconds": 0.2},
            "faults": {"downloads": {"truncate_first": 1, "mode": "silent", "fraction": 0.5}},
        }
    )
    client, output = _finished_output(emulator, tmp_path)
    cut = client.files.download(file=output).decode()
    assert cut.endswith("\n")
    assert 0 < len(cut.splitlines()) < 50


def test_too_many_active_batches_is_429(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {"clock": {"pending_seconds": 30}, "limits": {"max_active_batches": 2}}
    )
    client = emulator.sdk_client()
    uploaded = upload(client, tmp_path, '{"key": "a", "request": {"contents": []}}\n')
    for _ in range(2):
        client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    with pytest.raises(errors.ClientError) as caught:
        client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    assert caught.value.code == 429


def test_oversized_upload_is_refused_at_start(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"limits": {"max_file_bytes": 1000}})
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(errors.ClientError) as caught:
        client = emulator.sdk_client()
        client.files.upload(file=path, config={"mime_type": "jsonl"})
    assert caught.value.code == 400
    assert emulator.stats()["uploads"] == 0


def test_faults_can_be_changed_while_running(emulator: EmulatorProcess) -> None:
    client = emulator.sdk_client()
    assert list(client.files.list()) == []
    emulator.set_config({"faults": {"rules": [{"endpoint": "files.list", "status": 503}]}})
    with pytest.raises(errors.ServerError):
        list(client.files.list())
    emulator.set_config({"faults": {"rules": []}})
    assert list(client.files.list()) == []
