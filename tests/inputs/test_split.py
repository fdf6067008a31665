"""Splitting a file into tasks: consecutive byte ranges of whole lines within every limit."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gembatch.inputs import SplitLimits, TaskPlan, estimate_tokens, validate_file


def request_line(key: str, text_len: int) -> bytes:
    record = {"key": key, "request": {"contents": [{"parts": [{"text": "x" * text_len}]}]}}
    return json.dumps(record).encode()


def write_lines(path: Path, lines: list[bytes], newline_at_end: bool = True) -> bytes:
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    path.write_bytes(data)
    return data


def assert_tasks_tile_the_file(data: bytes, tasks: list[TaskPlan], start: int = 0) -> None:
    """Consecutive ranges of whole lines from `start` to the end, with honest counts."""
    assert tasks[0].start == start
    assert tasks[-1].end == len(data)
    for before, after in itertools.pairwise(tasks):
        assert before.end == after.start
    for task in tasks:
        assert task.size_bytes == task.end - task.start
        chunk = data[task.start : task.end]
        assert task.start == start or data[task.start - 1 : task.start] == b"\n"
        assert task.end == len(data) or chunk.endswith(b"\n")
        requests = [raw for raw in chunk.split(b"\n") if raw.strip()]
        assert task.count == len(requests)
        assert task.estimated_tokens == sum(estimate_tokens(raw) for raw in requests)


def test_default_is_one_task_for_the_whole_file(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "a.jsonl", [request_line(f"k{i}", 50) for i in range(100)])

    result = validate_file(tmp_path / "a.jsonl")

    assert result.tasks == [TaskPlan(0, len(data), 100, len(data), result.estimated_tokens)]


def test_split_by_bytes(tmp_path: Path) -> None:
    lines = [request_line(f"k{i}", 50) for i in range(10)]  # equal lengths
    data = write_lines(tmp_path / "a.jsonl", lines)
    per_line = len(lines[0]) + 1

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_bytes=3 * per_line + 5))

    assert [t.count for t in result.tasks] == [3, 3, 3, 1]
    assert_tasks_tile_the_file(data, result.tasks)


def test_split_by_requests(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "a.jsonl", [request_line(f"k{i}", i) for i in range(10)])

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_requests=4))

    assert [t.count for t in result.tasks] == [4, 4, 2]
    assert_tasks_tile_the_file(data, result.tasks)


def test_split_by_estimated_tokens(tmp_path: Path) -> None:
    lines = [request_line(f"k{i}", 396) for i in range(6)]
    data = write_lines(tmp_path / "a.jsonl", lines)
    tokens = estimate_tokens(lines[0])

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_tokens=2 * tokens))

    assert [t.count for t in result.tasks] == [2, 2, 2]
    assert all(t.estimated_tokens == 2 * tokens for t in result.tasks)
    assert_tasks_tile_the_file(data, result.tasks)


def test_a_request_over_the_token_limit_gets_a_task_of_its_own(tmp_path: Path) -> None:
    lines = [request_line("a", 10), request_line("big", 4000), request_line("c", 10)]
    data = write_lines(tmp_path / "a.jsonl", lines)

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_tokens=200))

    assert [t.count for t in result.tasks] == [1, 1, 1]
    assert_tasks_tile_the_file(data, result.tasks)


def test_blank_lines_ride_along_and_the_bom_is_left_out(tmp_path: Path) -> None:
    lines = [request_line("a", 10), b"", request_line("b", 10), b"  ", request_line("c", 10)]
    body = b"\n".join(lines) + b"\n\n"
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    data = b"\xef\xbb\xbf" + body

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_requests=2))

    assert [t.count for t in result.tasks] == [2, 1]
    assert_tasks_tile_the_file(data, result.tasks, start=3)


def test_last_line_without_newline_ends_the_last_task_at_the_end_of_file(tmp_path: Path) -> None:
    data = write_lines(
        tmp_path / "a.jsonl", [request_line(f"k{i}", 5) for i in range(5)], newline_at_end=False
    )

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_requests=2))

    assert [t.count for t in result.tasks] == [2, 2, 1]
    assert_tasks_tile_the_file(data, result.tasks)


def test_split_across_read_blocks(tmp_path: Path) -> None:
    """Lines straddling the 8 MiB read blocks are planned like any other."""
    lines = [request_line(f"k{i}", 70_000) for i in range(300)]  # ~21 MB
    data = write_lines(tmp_path / "a.jsonl", lines)

    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_bytes=5_000_000))

    assert sum(t.count for t in result.tasks) == 300
    assert all(t.size_bytes <= 5_000_000 for t in result.tasks)
    assert_tasks_tile_the_file(data, result.tasks)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    blanks=st.lists(st.booleans(), min_size=40, max_size=40),
    max_bytes=st.integers(400, 3000),
    max_requests=st.none() | st.integers(1, 10),
    max_tokens=st.none() | st.integers(100, 800),
    newline_at_end=st.booleans(),
)
def test_any_limits_give_tasks_that_tile_the_file_within_the_limits(
    tmp_path: Path,
    sizes: list[int],
    blanks: list[bool],
    max_bytes: int,
    max_requests: int | None,
    max_tokens: int | None,
    newline_at_end: bool,
) -> None:
    lines: list[bytes] = []
    for i, size in enumerate(sizes):
        lines.append(request_line(f"k{i}", size))
        if blanks[i] and i < len(sizes) - 1:
            lines.append(b"")
    data = write_lines(tmp_path / "p.jsonl", lines, newline_at_end)

    result = validate_file(tmp_path / "p.jsonl", SplitLimits(max_bytes, max_requests, max_tokens))

    assert_tasks_tile_the_file(data, result.tasks)
    assert sum(t.count for t in result.tasks) == result.count == len(sizes)
    for task in result.tasks:
        assert task.size_bytes <= max_bytes
        if max_requests:
            assert task.count <= max_requests
        if max_tokens and task.count > 1:
            assert task.estimated_tokens <= max_tokens
    # Greedy: no task could have taken the next task's first line.
    for before, after in itertools.pairwise(result.tasks):
        stop = data.find(b"\n", after.start) + 1 or len(data)
        first = data[after.start : stop]
        fits_bytes = before.size_bytes + len(first) <= max_bytes
        fits_requests = not max_requests or before.count + 1 <= max_requests
        fits_tokens = not max_tokens or (
            before.estimated_tokens + estimate_tokens(first.rstrip(b"\n")) <= max_tokens
        )
        assert not (fits_bytes and fits_requests and fits_tokens)


@pytest.mark.parametrize("max_requests", [1, 3])
def test_every_key_lands_in_exactly_one_task(tmp_path: Path, max_requests: int) -> None:
    from gembatch.inputs import iter_keys

    write_lines(tmp_path / "a.jsonl", [request_line(f"k{i}", i) for i in range(10)])
    result = validate_file(tmp_path / "a.jsonl", SplitLimits(max_requests=max_requests))

    keys = [list(iter_keys(tmp_path / "a.jsonl", t.start, t.end)) for t in result.tasks]

    assert [k for part in keys for k in part] == [f"k{i}" for i in range(10)]
    assert [len(part) for part in keys] == [t.count for t in result.tasks]
