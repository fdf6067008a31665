"""Sizes printed for people follow one convention: powers of 1024, named KiB/MiB/GiB."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gembatch.units import format_size
from tests.cli.helpers import gembatch


def _request_line(key: str, size: int) -> bytes:
    """A request line of exactly `size` bytes, newline included."""
    empty = json.dumps({"key": key, "request": {"contents": [{"parts": [{"text": ""}]}]}})
    text = "x" * (size - len(empty) - 1)
    line = json.dumps({"key": key, "request": {"contents": [{"parts": [{"text": text}]}]}})
    return (line + "\n").encode()


def test_dry_run_gives_file_sizes_in_binary_units(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(_request_line("a", 1024) + _request_line("b", 1024))
    (tmp_path / "b.jsonl").write_bytes(b"".join(_request_line(f"k{i}", 1024) for i in range(3)))
    done = gembatch(None, tmp_path, "submit", "--dry-run", "a.jsonl", "b.jsonl")
    assert done.returncode == 0, done.stderr
    assert "a.jsonl: 2 requests, 2.0 KiB" in done.stdout, done.stdout
    assert "b.jsonl: 3 requests, 3.0 KiB" in done.stdout, done.stdout
    assert "5 requests, 5.0 KiB would be submitted" in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1_000_000, "976.6 KiB"),
        (1024**2 - 1, "1.0 MiB"),  # rounds up into the next unit, never "1024.0 KiB"
        (2 * 1024**3, "2.0 GiB"),  # Gemini's input file limit
        (5 * 1024**4, "5.0 TiB"),
        (2048 * 1024**4, "2048.0 TiB"),
    ],
)
def test_sizes_are_counted_in_powers_of_1024_and_say_so(n: int, text: str) -> None:
    assert format_size(n) == text
