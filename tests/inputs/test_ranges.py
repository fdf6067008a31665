"""Reading validated files back: byte ranges for uploads, keys, and subsets for retries."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.inputs import (
    SplitLimits,
    iter_keys,
    open_range,
    validate_file,
    write_subset,
)


def write_requests(path: Path, keys: list[str], text: str = "hello") -> bytes:
    lines = [
        json.dumps({"key": k, "request": {"contents": [{"parts": [{"text": f"{text} {k}"}]}]}})
        for k in keys
    ]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return data


def test_open_range_reads_seeks_and_tells_within_its_range(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 4
    path.write_bytes(data)
    window = data[100:300]

    with open_range(path, 100, 300) as view:
        assert isinstance(view, io.IOBase) and view.readable() and view.seekable()
        assert "b" in view.mode  # type: ignore[attr-defined]
        assert view.read(10) == window[:10]
        assert view.tell() == 10
        assert view.seek(0, os.SEEK_END) == 200
        assert view.read(5) == b""
        view.seek(-3, os.SEEK_END)
        assert view.read() == window[-3:]
        view.seek(5)
        view.seek(5, os.SEEK_CUR)
        buffer = bytearray(4)
        assert view.readinto(buffer) == 4 and bytes(buffer) == window[10:14]
        view.seek(0)
        assert view.read() == window
        with pytest.raises(ValueError):
            view.seek(-1)
    assert view.closed
    with pytest.raises(ValueError):
        view.read(1)


def test_open_range_refuses_a_range_outside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"12345")
    with pytest.raises(ValueError, match="outside"):
        open_range(path, 2, 6)
    with pytest.raises(ValueError, match="outside"):
        open_range(path, 4, 3)
    with open_range(path, 5, 5) as empty:
        assert empty.read() == b""


def test_sdk_uploads_a_middle_task_of_a_file_byte_for_byte(tmp_path: Path) -> None:
    """google-genai reads the view in 8 MiB chunks after seeking to measure it."""
    path = tmp_path / "big.jsonl"
    data = write_requests(path, [f"k{i}" for i in range(75_000)], text="x" * 300)
    result = validate_file(path, SplitLimits(max_bytes=len(data) // 3 + 1000))
    assert len(result.tasks) == 3
    middle = result.tasks[1]
    assert middle.size_bytes > 8 * 1024 * 1024  # more than one upload chunk

    with EmulatorProcess() as emulator:
        client = emulator.sdk_client()
        with open_range(path, middle.start, middle.end) as source:
            uploaded = client.files.upload(
                file=source, config={"mime_type": "jsonl", "display_name": "x"}
            )
        assert uploaded.name and uploaded.size_bytes == middle.size_bytes
        downloaded = client.files.download(file=uploaded.name)

    assert downloaded == data[middle.start : middle.end]


def test_iter_keys_reads_the_keys_of_a_range_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    keys = ["a", 'quote"d', "back\\slash", "ユニコード", "nested"]
    lines = [json.dumps({"key": k, "request": {"contents": [1]}}, ensure_ascii=False) for k in keys]
    # Key last, a nested "key", blank lines, CRLF and a BOM: all still read right.
    lines[-1] = '{"request": {"contents": [{"key": "inner"}]}, "key": "nested"}'
    body = "\r\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())

    assert list(iter_keys(path)) == keys
    result = validate_file(path, SplitLimits(max_requests=2))
    assert [list(iter_keys(path, t.start, t.end)) for t in result.tasks] == [
        keys[:2],
        keys[2:4],
        keys[4:],
    ]


def test_write_subset_copies_the_chosen_lines_in_input_order(tmp_path: Path) -> None:
    source = tmp_path / "a.jsonl"
    data = write_requests(source, [f"k{i}" for i in range(10)])
    # The last line without its newline still comes out whole.
    source.write_bytes(b"\xef\xbb\xbf" + data.rstrip(b"\n"))
    dest = tmp_path / "work" / "retry.jsonl"  # its directory is created

    count = write_subset(source, {"k9", "k2", "k5", "not-there"}, dest)

    assert count == 3
    lines = data.splitlines(keepends=True)
    assert dest.read_bytes() == lines[2] + lines[5] + lines[9]
    assert validate_file(dest).count == 3
    assert [p.name for p in dest.parent.iterdir()] == ["retry.jsonl"]  # no temp file left


def test_write_subset_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    source = tmp_path / "a.jsonl"
    write_requests(source, ["a", "b"])
    dest = tmp_path / "retry.jsonl"
    dest.write_text("old contents\n" * 100)

    assert write_subset(source, ["b"], dest) == 1

    assert list(iter_keys(dest)) == ["b"]
