"""The real google-genai SDK against an emulator process: Files."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import httpx
import pytest
from google.genai import errors

from gembatch.emulator.process import EmulatorProcess


def test_20mb_file_goes_up_in_three_chunks_and_downloads_byte_identical(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    data = os.urandom(20 * 1024 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    client = emulator.sdk_client()

    uploaded = client.files.upload(
        file=path, config={"mime_type": "application/octet-stream", "display_name": "big"}
    )

    assert uploaded.name and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == len(data)
    assert uploaded.display_name == "big"
    assert uploaded.state is not None and uploaded.state.name == "ACTIVE"
    expected_hash = base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode()
    assert uploaded.sha256_hash == expected_hash
    calls = emulator.stats()["calls"]
    assert calls["files.upload"] == 1
    assert calls["files.upload_chunk"] == 3  # 8 MiB + 8 MiB + 4 MiB
    assert client.files.download(file=uploaded.name) == data


def test_files_get_list_and_delete_round_trip(emulator: EmulatorProcess, tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_text('{"key": "a", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}\n')
    client = emulator.sdk_client()
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    assert uploaded.mime_type == "jsonl"
    assert uploaded.source is not None and uploaded.source.name == "UPLOADED"

    fetched = client.files.get(name=uploaded.name)
    assert fetched.name == uploaded.name
    assert fetched.expiration_time > fetched.create_time
    # a bare id works too
    assert client.files.get(name=uploaded.name.removeprefix("files/")).name == uploaded.name

    client.files.delete(name=uploaded.name)
    with pytest.raises(errors.ClientError) as caught:
        client.files.get(name=uploaded.name)
    assert caught.value.code == 403
    assert caught.value.status == "PERMISSION_DENIED"
    assert emulator.stats()["files_deleted"] == 1


def test_file_with_a_chosen_name_and_conflict(emulator: EmulatorProcess, tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("abc")
    client = emulator.sdk_client()
    uploaded = client.files.upload(
        file=path, config={"name": "my-file-1", "mime_type": "text/plain"}
    )
    assert uploaded.name == "files/my-file-1"
    with pytest.raises(errors.ClientError) as caught:
        client.files.upload(file=path, config={"name": "my-file-1", "mime_type": "text/plain"})
    assert caught.value.code == 409


def test_paging_over_more_files_than_a_page_returns_all_with_no_empty_page(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    client = emulator.sdk_client()
    names = set()
    for i in range(25):
        path = tmp_path / f"f{i}.txt"
        path.write_text(str(i))
        names.add(client.files.upload(file=path, config={"mime_type": "text/plain"}).name)

    listed = [f.name for f in client.files.list(config={"page_size": 10})]
    assert sorted(listed) == sorted(names)
    assert len(listed) == 25
    # an exact multiple of the page size must not end with an empty page plus a token
    assert len([f.name for f in client.files.list(config={"page_size": 5})]) == 25

    # raw pages: never empty while a token is given; no token on the last page
    token, pages = None, []
    while True:
        params = {"pageSize": "5"} | ({"pageToken": token} if token else {})
        body = httpx.get(
            f"{emulator.base_url}/v1beta/files",
            params=params,
            headers={"x-goog-api-key": emulator.api_key},
        ).json()
        pages.append(len(body.get("files", [])))
        token = body.get("nextPageToken")
        if not token:
            break
    assert pages == [5, 5, 5, 5, 5]


def test_empty_file_list_is_an_empty_object(emulator: EmulatorProcess) -> None:
    response = httpx.get(
        f"{emulator.base_url}/v1/files", headers={"x-goog-api-key": emulator.api_key}
    )
    assert response.status_code == 200
    assert response.json() == {}
    client = emulator.sdk_client()
    assert list(client.files.list()) == []


def test_empty_file_uploads_in_one_finalizing_request(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    client = emulator.sdk_client()
    uploaded = client.files.upload(file=path, config={"mime_type": "text/plain"})
    assert uploaded.size_bytes == 0
    assert emulator.stats()["calls"]["files.upload_chunk"] == 1
