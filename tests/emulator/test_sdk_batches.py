"""The real google-genai SDK against an emulator process: Batch Mode."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.genai import types

from gembatch.emulator.process import EmulatorProcess
from tests.conftest import wait_for, write_requests

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def raw_batch(emulator: EmulatorProcess, name: str) -> dict[str, Any]:
    response = httpx.get(
        f"{emulator.base_url}/v1beta/{name}", headers={"x-goog-api-key": emulator.api_key}
    )
    response.raise_for_status()
    return response.json()


def create_file_batch(
    emulator: EmulatorProcess, tmp_path: Path, prompts: list[str], display_name: str = "job"
) -> tuple[Any, list[dict[str, Any]]]:
    client = emulator.sdk_client()
    path = write_requests(tmp_path / f"{display_name}.jsonl", prompts)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    batch = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": display_name}
    )
    return batch, lines


def wait_terminal(client: Any, name: str, timeout: float = 30.0) -> Any:
    return wait_for(
        lambda: (b := client.batches.get(name=name)).state.name in TERMINAL and b, timeout
    )


def test_batch_is_seen_pending_then_running_with_moving_counts_then_succeeded(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 1.0, "running_seconds": 3.0}})
    prompts = [f"question number {i}" for i in range(40)]
    batch, lines = create_file_batch(emulator, tmp_path, prompts)
    client = emulator.sdk_client()

    assert batch.name.startswith("batches/")
    assert batch.state.name == "JOB_STATE_PENDING"
    assert batch.display_name == "job"
    assert batch.model == "models/gemini-2.5-flash"
    first = raw_batch(emulator, batch.name)
    assert first["metadata"]["state"] == "BATCH_STATE_PENDING"
    assert first["metadata"]["batchStats"] == {"requestCount": "40", "pendingRequestCount": "40"}
    assert "done" not in first

    states, succeeded_counts = [], []
    while True:
        typed = client.batches.get(name=batch.name)
        raw = raw_batch(emulator, batch.name)
        states.append(typed.state.name)
        stats = raw["metadata"]["batchStats"]
        if raw["metadata"]["state"] == "BATCH_STATE_RUNNING":
            succeeded_counts.append(int(stats.get("successfulRequestCount", "0")))
        if typed.state.name in TERMINAL:
            break
        time.sleep(0.1)

    seen = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert seen == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert len(set(succeeded_counts)) >= 3, succeeded_counts  # counts move while running
    assert succeeded_counts == sorted(succeeded_counts)

    final = client.batches.get(name=batch.name)
    batch_id = batch.name.removeprefix("batches/")
    assert final.dest.file_name == f"files/batch-{batch_id}"
    assert final.end_time is not None and final.end_time >= final.create_time
    assert final.done is True
    raw = raw_batch(emulator, batch.name)
    assert raw["done"] is True
    assert raw["metadata"]["batchStats"] == {"requestCount": "40", "successfulRequestCount": "40"}
    assert raw["response"]["responsesFile"] == final.dest.file_name

    output = client.files.download(file=final.dest.file_name).decode()
    out_lines = [json.loads(line) for line in output.splitlines()]
    assert sorted(line["key"] for line in out_lines) == sorted(line["key"] for line in lines)
    assert [line["key"] for line in out_lines] != [line["key"] for line in lines]  # shuffled
    for line in out_lines:
        response = types.GenerateContentResponse.model_validate(line["response"])
        assert response.text
        assert response.usage_metadata.total_token_count > 0
    generated = client.files.get(name=final.dest.file_name)
    assert generated.source.name == "GENERATED"
    assert generated.download_uri.endswith(
        f"/download/v1/files/batch-{batch_id}:download?alt=media"
    )


def test_error_lines_are_counted_and_the_batch_still_succeeds(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    prompts = ["fine", "please fail [[emulator:error]]", "also fine", "[[emulator:error=8]] quota"]
    batch, _ = create_file_batch(emulator, tmp_path, prompts)
    final = wait_terminal(emulator.sdk_client(), batch.name)
    assert final.state.name == "JOB_STATE_SUCCEEDED"
    stats = raw_batch(emulator, batch.name)["metadata"]["batchStats"]
    assert stats == {"requestCount": "4", "successfulRequestCount": "2", "failedRequestCount": "2"}
    client = emulator.sdk_client()
    output = client.files.download(file=final.dest.file_name).decode()
    by_key = {json.loads(line)["key"]: json.loads(line) for line in output.splitlines()}
    assert by_key["k2"]["error"]["code"] == 13
    assert by_key["k4"]["error"]["code"] == 8
    assert "response" in by_key["k1"] and "error" not in by_key["k1"]


def test_inline_batch_returns_double_nested_responses_with_metadata(
    emulator: EmulatorProcess,
) -> None:
    client = emulator.sdk_client()
    batch = client.batches.create(
        model="gemini-2.5-flash",
        src=[
            {
                "contents": [{"parts": [{"text": "inline one"}], "role": "user"}],
                "config": {"system_instruction": "be brief", "temperature": 0.1},
                "metadata": {"key": "k1"},
            },
            {
                "contents": [{"parts": [{"text": "boom [[emulator:error=3]]"}]}],
                "metadata": {"key": "k2"},
            },
            {"contents": "a plain string", "metadata": {"key": "k3"}},
        ],
        config={"display_name": "inline-job"},
    )
    assert raw_batch(emulator, batch.name)["metadata"].get("inputConfig") is None
    final = wait_terminal(client, batch.name)
    assert final.state.name == "JOB_STATE_SUCCEEDED"
    responses = {r.metadata["key"]: r for r in final.dest.inlined_responses}
    assert set(responses) == {"k1", "k2", "k3"}
    assert responses["k1"].response.text
    assert responses["k3"].response.text
    assert responses["k2"].error.code == 3
    raw = raw_batch(emulator, batch.name)
    nested = raw["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert len(nested) == 3
    assert raw["response"]["inlinedResponses"]["inlinedResponses"] == nested


def test_cancel_gives_cancelled(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 30}})
    batch, _ = create_file_batch(emulator, tmp_path, ["a", "b", "c"])
    client = emulator.sdk_client()
    wait_for(lambda: client.batches.get(name=batch.name).state.name == "JOB_STATE_RUNNING")
    client.batches.cancel(name=batch.name)
    final = client.batches.get(name=batch.name)
    assert final.state.name == "JOB_STATE_CANCELLED"
    assert final.end_time is not None
    assert final.dest is None
    assert emulator.stats()["batches_cancelled"] == 1


def test_expiry_setting_gives_expired(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {"clock": {"pending_seconds": 0.2, "running_seconds": 30, "expire_after_seconds": 1.0}}
    )
    batch, _ = create_file_batch(emulator, tmp_path, ["a", "b"])
    final = wait_terminal(emulator.sdk_client(), batch.name)
    assert final.state.name == "JOB_STATE_EXPIRED"
    assert final.dest is None


def test_stuck_batches_expire_when_injected(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.1, "running_seconds": 0.2, "expire_after_seconds": 1.5},
            "faults": {"batches": {"expire_rate": 1.0}},
        }
    )
    batch, _ = create_file_batch(emulator, tmp_path, ["a"])
    client = emulator.sdk_client()
    time.sleep(0.5)
    assert client.batches.get(name=batch.name).state.name == "JOB_STATE_PENDING"
    assert wait_terminal(client, batch.name).state.name == "JOB_STATE_EXPIRED"


def test_failed_batch_when_injected(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.1, "running_seconds": 0.3},
            "faults": {"batches": {"fail_rate": 1.0, "match": "doomed"}},
        }
    )
    doomed, _ = create_file_batch(emulator, tmp_path, ["a"], display_name="doomed")
    fine, _ = create_file_batch(emulator, tmp_path, ["a"], display_name="fine")
    client = emulator.sdk_client()
    assert wait_terminal(client, doomed.name).state.name == "JOB_STATE_FAILED"
    assert wait_terminal(client, fine.name).state.name == "JOB_STATE_SUCCEEDED"
    assert raw_batch(emulator, doomed.name)["error"]["code"] == 13


def test_batch_list_pages_through_everything_and_needs_page_size(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    client = emulator.sdk_client()
    path = write_requests(tmp_path / "in.jsonl", ["x"])
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    names = {
        client.batches.create(
            model="gemini-2.5-flash-lite", src=uploaded.name, config={"display_name": f"b{i}"}
        ).name
        for i in range(8)
    }
    # The real service answers an empty list without page_size (python-genai#1250).
    assert list(client.batches.list()) == []
    listed = [b.name for b in client.batches.list(config={"page_size": 3})]
    assert sorted(listed) == sorted(names)


def test_batch_list_paging_on_an_exact_multiple_of_the_page_size_has_no_empty_page(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    client = emulator.sdk_client()
    path = write_requests(tmp_path / "in.jsonl", ["x"])
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    names = [
        client.batches.create(
            model="gemini-2.5-flash-lite", src=uploaded.name, config={"display_name": f"b{i}"}
        ).name
        for i in range(9)
    ]

    def raw_pages(size: int) -> list[list[str]]:
        """Every page as the server sends it, following nextPageToken to the end."""
        token, pages = None, []
        while True:
            params = {"pageSize": str(size)} | ({"pageToken": token} if token else {})
            response = httpx.get(
                f"{emulator.base_url}/v1beta/batches",
                params=params,
                headers={"x-goog-api-key": emulator.api_key},
            )
            response.raise_for_status()
            body = response.json()
            pages.append([operation["name"] for operation in body.get("operations", [])])
            token = body.get("nextPageToken")
            if not token:
                return pages
            assert len(pages) <= len(names), "the pages never end"

    for size, shape in [(3, [3, 3, 3]), (1, [1] * 9), (9, [9]), (10, [9])]:
        pages = raw_pages(size)
        assert [len(page) for page in pages] == shape, f"pageSize {size}"
        listed = [name for page in pages for name in page]
        assert sorted(listed) == sorted(names)  # each batch once

    # The SDK's pager over the same: every batch, and exactly three pages of three.
    pager = client.batches.list(config={"page_size": 3})
    seen_pages = [[b.name for b in pager.page]]
    while pager.config.get("page_token"):  # the SDK's own test for "more pages"
        seen_pages.append([b.name for b in pager.next_page()])
    assert [len(page) for page in seen_pages] == [3, 3, 3]
    assert sorted(name for page in seen_pages for name in page) == sorted(names)
    assert sorted(b.name for b in client.batches.list(config={"page_size": 3})) == sorted(names)


def test_deleted_batch_is_gone(emulator: EmulatorProcess, tmp_path: Path) -> None:
    batch, _ = create_file_batch(emulator, tmp_path, ["a"])
    client = emulator.sdk_client()
    client.batches.delete(name=batch.name)
    from google.genai import errors

    with pytest.raises(errors.ClientError) as caught:
        client.batches.get(name=batch.name)
    assert caught.value.code == 404
    assert batch.name not in [b.name for b in client.batches.list(config={"page_size": 50})]
    stats = emulator.stats()
    assert stats["batches_deleted"] == 1
    assert stats["batches_deleted_while_active"] == 1


def test_introspection_counts_creates_per_display_name(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    create_file_batch(emulator, tmp_path, ["a"], display_name="alpha")
    create_file_batch(emulator, tmp_path, ["a"], display_name="alpha")
    create_file_batch(emulator, tmp_path, ["a"], display_name="beta")
    stats = emulator.stats()
    assert stats["creates_by_display_name"] == {"alpha": 2, "beta": 1}
    assert stats["batches_created"] == 3
    assert stats["uploads"] == 3


@pytest.mark.parametrize("api_version", ["v1", "v1beta", "v1alpha"])
def test_every_api_version_runs_the_whole_flow(
    emulator: EmulatorProcess, tmp_path: Path, api_version: str
) -> None:
    client = emulator.sdk_client(api_version=api_version)
    path = write_requests(tmp_path / "v.jsonl", ["one", "two"])
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    batch = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
    final = wait_terminal(client, batch.name)
    assert final.state.name == "JOB_STATE_SUCCEEDED"
    data = client.files.download(file=final.dest.file_name)
    assert len(data.decode().splitlines()) == 2
