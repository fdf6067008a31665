"""Validating request files: every bad input named by file:line with what to do."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gembatch.errors import UserError
from gembatch.inputs import (
    InputInvalid,
    InputProblem,
    SplitLimits,
    estimate_tokens,
    validate_file,
    validate_files,
)

GOOD = {"contents": [{"parts": [{"text": "hi"}]}]}


def line(key: object = "k1", request: object = GOOD, **extra: object) -> str:
    record: dict[str, object] = {"key": key, "request": request}
    record.update(extra)
    return json.dumps(record, ensure_ascii=False)


@pytest.fixture
def batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `batch/` directory, with the working directory set so paths read `batch/a.jsonl`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch").mkdir()
    return tmp_path / "batch"


def problems_of(path: str, **kwargs: object) -> list[str]:
    with pytest.raises(InputInvalid) as caught:
        validate_file(path, **kwargs)  # type: ignore[arg-type]
    return [str(problem) for problem in caught.value.problems]


def write(path: Path, *lines: str, end: str = "\n") -> None:
    path.write_bytes((end.join(lines) + end).encode())


# -- good files ---------------------------------------------------------------------------


def test_valid_file_reports_count_size_hash_and_one_task(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), line("k2"), line("k3"))
    data = (batch / "a.jsonl").read_bytes()

    result = validate_file("batch/a.jsonl")

    assert result.display == "batch/a.jsonl"
    assert result.path == (batch / "a.jsonl").resolve()
    assert (result.count, result.size_bytes) == (3, len(data))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert len(result.tasks) == 1
    task = result.tasks[0]
    assert (task.start, task.end, task.count, task.size_bytes) == (0, len(data), 3, len(data))
    assert task.estimated_tokens == result.estimated_tokens
    assert result.estimated_tokens == sum(estimate_tokens(raw) for raw in data.splitlines())


def test_blank_lines_are_skipped_but_counted_in_line_numbers(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), "", "   ", line("k1"))

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:4: duplicate key "k1" (first on line 1); keys must be unique'
    ]


def test_bom_crlf_and_missing_final_newline_are_accepted(batch: Path) -> None:
    body = ("\r\n".join([line("k1"), "", line("k2")])).encode()
    (batch / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + body)

    result = validate_file("batch/a.jsonl")

    assert result.count == 2
    assert result.sha256 == hashlib.sha256(b"\xef\xbb\xbf" + body).hexdigest()
    # The BOM is never uploaded: the first task starts after it.
    assert [(t.start, t.end) for t in result.tasks] == [(3, 3 + len(body))]


def test_either_spelling_of_request_fields_is_accepted(batch: Path) -> None:
    camel = {**GOOD, "generationConfig": {"temperature": 0}, "systemInstruction": {"parts": []}}
    snake = {**GOOD, "generation_config": {"thinking_config": {}}, "cached_content": "c/1"}
    every = {
        **GOOD,
        "model": "models/x",
        "tools": [],
        "toolConfig": {},
        "safety_settings": [],
        "labels": {"a": "b"},
    }
    write(batch / "a.jsonl", line("a", camel), line("b", snake), line("c", every))

    assert validate_file("batch/a.jsonl").count == 3


def test_unicode_keys_and_text_are_fine(batch: Path) -> None:
    write(batch / "a.jsonl", line("キー1", {"contents": [{"parts": [{"text": "解释广义相对论"}]}]}))

    assert validate_file("batch/a.jsonl").count == 1


# -- the file itself ----------------------------------------------------------------------


def test_missing_file(batch: Path) -> None:
    assert problems_of("batch/nope.jsonl") == ["batch/nope.jsonl: no such file; check the path"]


def test_directory_says_to_pass_its_files(batch: Path) -> None:
    assert problems_of("batch") == [
        "batch: is a directory; pass its files, e.g. `gembatch submit batch/*.jsonl`"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(batch: Path) -> None:
    path = batch / "a.jsonl"
    write(path, line())
    path.chmod(0)

    assert problems_of("batch/a.jsonl") == [
        "batch/a.jsonl: cannot be read (permission denied); check the file's permissions"
    ]


def test_empty_file(batch: Path) -> None:
    (batch / "a.jsonl").write_bytes(b"")

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl: is empty; it needs one JSON request per line, like {"key": "k1", '
        '"request": {...}}'
    ]


def test_only_blank_lines(batch: Path) -> None:
    (batch / "a.jsonl").write_bytes(b"\n  \n\r\n")

    [problem] = problems_of("batch/a.jsonl")
    assert problem.startswith("batch/a.jsonl: has only blank lines;")


def test_utf16_file_is_named_as_such(batch: Path) -> None:
    (batch / "a.jsonl").write_bytes((line() + "\n").encode("utf-16"))

    assert problems_of("batch/a.jsonl") == ["batch/a.jsonl: is UTF-16-encoded; save it as UTF-8"]


def test_not_utf8_names_line_and_byte_offset(batch: Path) -> None:
    good = line("k1") + "\n"
    bad = '{"key": "k2", "request": {"contents": [{"parts": [{"text": "caf\xe9"}]}]}}'
    (batch / "a.jsonl").write_bytes(good.encode() + bad.encode("latin-1") + b"\n")
    column = bad.index("\xe9")

    assert problems_of("batch/a.jsonl") == [
        f"batch/a.jsonl:2: not valid UTF-8 at byte {column + 1} of the line "
        f"(file offset {len(good) + column}): save the file as UTF-8"
    ]


# -- each line ----------------------------------------------------------------------------


def test_invalid_json_names_line_column_and_json_message(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), '{"key": "k2", "request": {"contents": [1]}', line("k3"))

    assert problems_of("batch/a.jsonl") == [
        "batch/a.jsonl:2: invalid JSON at column 43: Expecting ',' delimiter; "
        "each line must be one complete JSON object"
    ]


def test_extra_data_after_the_object_is_invalid(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1") + " " + line("k2"))

    [problem] = problems_of("batch/a.jsonl")
    assert problem.startswith("batch/a.jsonl:1: invalid JSON at column ")
    assert "Extra data" in problem


def test_pretty_printed_json_gets_a_hint(batch: Path) -> None:
    (batch / "a.jsonl").write_text(json.dumps({"key": "k1", "request": GOOD}, indent=2))

    problems = problems_of("batch/a.jsonl")
    assert problems[0].startswith("batch/a.jsonl:1: invalid JSON at column 2")
    assert "pretty-printed JSON" in problems[0]


def test_line_that_is_not_an_object(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), '"just text"', "[1, 2]", "null")

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:2: expected a JSON object like {"key": "k1", "request": {...}}, '
        "found a string",
        'batch/a.jsonl:3: expected a JSON object like {"key": "k1", "request": {...}}, '
        "found an array (JSONL has one request object per line, not a JSON array)",
        'batch/a.jsonl:4: expected a JSON object like {"key": "k1", "request": {...}}, found null',
    ]


def test_missing_key(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), json.dumps({"request": GOOD}))

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:2: missing "key": give every line a unique string "key" to match its '
        "result to it"
    ]


def test_key_must_be_a_non_empty_string(batch: Path) -> None:
    write(batch / "a.jsonl", line(7), line(""), line(None), line(["k"]))

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:1: "key" must be a string, found a number: write it as "key": "7"',
        'batch/a.jsonl:2: "key" is empty: give every line a unique, non-empty string "key"',
        'batch/a.jsonl:3: missing "key": give every line a unique string "key" to match its '
        "result to it",
        'batch/a.jsonl:4: "key" must be a non-empty string, found an array',
    ]


def test_duplicate_key_names_the_first_line(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"), line("k3"), line("k2"), line("k3"), line("k3"))

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:4: duplicate key "k3" (first on line 2); keys must be unique',
        'batch/a.jsonl:5: duplicate key "k3" (first on line 2); keys must be unique',
    ]


def test_missing_request_and_request_not_an_object(batch: Path) -> None:
    write(
        batch / "a.jsonl",
        json.dumps({"key": "k1"}),
        json.dumps({"key": "k2", "request": "hello"}),
        json.dumps({"key": "k3", "contents": GOOD["contents"]}),
    )

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:1: missing "request": put the GenerateContentRequest under "request", '
        'e.g. {"key": "k1", "request": {"contents": [...]}}',
        'batch/a.jsonl:2: "request" must be a JSON object (a GenerateContentRequest), '
        "found a string",
        'batch/a.jsonl:3: "contents" must be inside "request": {"key": "k1", "request": '
        '{"contents": [...]}}',
    ]


def test_request_without_usable_contents(batch: Path) -> None:
    write(
        batch / "a.jsonl",
        line("k1", {"generation_config": {}}),
        line("k2", {"contents": []}),
        line("k3", {"contents": {"parts": []}}),
        line("k4", {"messages": [{"role": "user", "content": "hi"}]}),
    )

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:1: request has no "contents": add "contents": [{"parts": [{"text": '
        '"..."}]}]',
        'batch/a.jsonl:2: "contents" is empty: add at least one Content, e.g. [{"parts": '
        '[{"text": "..."}]}]',
        'batch/a.jsonl:3: "contents" must be a non-empty array of Content objects, found an object',
        'batch/a.jsonl:4: request has "messages" instead of "contents": write "contents": '
        '[{"role": "user", "parts": [{"text": "..."}]}]',
    ]


@pytest.mark.parametrize(
    "field",
    ["thinking_config", "temperature", "response_mime_type", "response_schema", "maxOutputTokens"],
)
def test_generation_config_fields_at_request_level_get_a_hint(batch: Path, field: str) -> None:
    write(batch / "a.jsonl", line("k1"), line("k2", {**GOOD, field: 1}))

    assert problems_of("batch/a.jsonl") == [
        f'batch/a.jsonl:2: request has "{field}" at the top level; it belongs inside '
        f'generation_config, e.g. "generation_config": {{"{field}": ...}}'
    ]


def test_misspelled_and_unknown_request_fields(batch: Path) -> None:
    write(
        batch / "a.jsonl",
        line("k1", {**GOOD, "system_instructions": {"parts": []}}),
        line("k2", {**GOOD, "generation_confg": {}}),
        line("k3", {**GOOD, "config": {}}),
        line("k4", {**GOOD, "frobnicate": 1}),
    )

    assert problems_of("batch/a.jsonl") == [
        'batch/a.jsonl:1: request has an unknown field "system_instructions": did you mean '
        '"system_instruction"?',
        'batch/a.jsonl:2: request has an unknown field "generation_confg": did you mean '
        '"generation_config"?',
        'batch/a.jsonl:3: request has "config" (the SDK\'s GenerateContentConfig); on the wire '
        "its fields go into generation_config, system_instruction, tools and safety_settings",
        'batch/a.jsonl:4: request has an unknown field "frobnicate"; a GenerateContentRequest '
        "has contents, generation_config, system_instruction, tools, tool_config, "
        "safety_settings, cached_content, labels, model",
    ]


def test_openai_batch_lines_are_recognised(batch: Path) -> None:
    openai = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    write(batch / "a.jsonl", json.dumps(openai))

    problems = problems_of("batch/a.jsonl")
    assert problems[0].startswith('batch/a.jsonl:1: missing "key" ("custom_id", "method"')
    assert problems[1].startswith('batch/a.jsonl:1: missing "request" ("body" is OpenAI')


def test_deeply_nested_json_is_a_problem_not_a_crash(batch: Path) -> None:
    write(batch / "a.jsonl", "[" * 100_000 + "]" * 100_000)

    [problem] = problems_of("batch/a.jsonl")
    assert problem.startswith("batch/a.jsonl:1: ")


# -- limits on the report -------------------------------------------------------------


def test_half_a_surrogate_pair_is_a_problem_with_its_line(batch: Path) -> None:
    # json.loads reads "\\ud800" as a lone surrogate: a string no UTF-8 file (and no
    # Gemini request) can hold. A whole pair, or an escaped backslash before "ud800", is
    # fine.
    def text(value: str) -> str:
        return '{"key": "k", "request": {"contents": [{"parts": [{"text": "' + value + '"}]}]}}'

    write(
        batch / "a.jsonl",
        line("k1"),
        text("x \\ud800").replace('"k"', '"k2"'),
        text("\\ud83d\\ude00 and \\\\ud800").replace('"k"', '"k3"'),
        '{"key": "\\udfff", "request": {"contents": [{"parts": [{"text": "x"}]}]}}',
        text("\\ud83d\\\\ude00").replace('"k"', '"k5"'),
    )
    problems = problems_of("batch/a.jsonl")
    assert [p.split(": ", 1)[0] for p in problems] == [
        "batch/a.jsonl:2", "batch/a.jsonl:4", "batch/a.jsonl:5",
    ]  # fmt: skip
    assert all("surrogate pair" in p and "whole pair" in p for p in problems)


def test_nan_and_infinity_are_problems_with_their_line(batch: Path) -> None:
    write(
        batch / "a.jsonl",
        line("k1"),
        '{"key": "k2", "request": {"contents": [{"parts": [{"text": "x"}]}], '
        '"generation_config": {"temperature": NaN}}}',
        '{"key": "k3", "request": {"contents": [{"parts": [{"text": "x"}]}], '
        '"generation_config": {"seed": -Infinity}}}',
        line("k4", {"contents": [{"parts": [{"text": "NaN"}]}]}),
    )
    problems = problems_of("batch/a.jsonl")
    assert problems == [
        "batch/a.jsonl:2: NaN is not a JSON number: write null, or the value as a string",
        "batch/a.jsonl:3: -Infinity is not a JSON number: write null, or the value as a string",
    ]


def test_problems_stop_at_max_problems_and_the_rest_are_counted(batch: Path) -> None:
    write(batch / "a.jsonl", *["not json"] * 30)

    with pytest.raises(InputInvalid) as caught:
        validate_file("batch/a.jsonl", max_problems=5)

    error = caught.value
    assert [p.line for p in error.problems] == [1, 2, 3, 4, 5]
    assert error.omitted == 25 and error.total == 30
    text = str(error)
    assert text.splitlines()[0] == (
        "the input has 30 problems; nothing was submitted. Fix and run again:"
    )
    assert text.splitlines()[-1] == "  ... and 25 more"
    assert isinstance(error, UserError)


def test_validate_files_reports_every_file_at_once(batch: Path) -> None:
    write(batch / "good.jsonl", line("k1"))
    write(batch / "bad.jsonl", line("k1"), line("k1"))
    write(batch / "worse.jsonl", *["{"] * 25)

    with pytest.raises(InputInvalid) as caught:
        validate_files(
            ["batch/good.jsonl", "batch/bad.jsonl", "batch/nope.jsonl", "batch/worse.jsonl"]
        )

    error = caught.value
    assert [str(p) for p in error.problems[:2]] == [
        'batch/bad.jsonl:2: duplicate key "k1" (first on line 1); keys must be unique',
        "batch/nope.jsonl: no such file; check the path",
    ]
    assert error.total == 2 + 25
    lines = str(error).splitlines()
    assert len(lines) == 1 + 20 + 1  # header, the first 20, "... and N more"
    assert lines[-1] == "  ... and 7 more"


def test_validate_files_refuses_the_same_file_twice(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"))

    with pytest.raises(InputInvalid) as caught:
        validate_files(["batch/a.jsonl", "batch/../batch/a.jsonl"])

    assert [str(p) for p in caught.value.problems] == [
        "batch/../batch/a.jsonl: is the same file as batch/a.jsonl; pass it once"
    ]


def test_validate_files_returns_every_file_when_all_are_good(batch: Path) -> None:
    write(batch / "a.jsonl", line("k1"))
    write(batch / "b.jsonl", line("k1"), line("k2"))

    results = validate_files(["batch/a.jsonl", "batch/b.jsonl"])

    assert [(r.display, r.count) for r in results] == [("batch/a.jsonl", 1), ("batch/b.jsonl", 2)]


def test_line_larger_than_the_task_limit(batch: Path) -> None:
    write(
        batch / "a.jsonl", line("k1"), line("k2", {"contents": [{"parts": [{"text": "x" * 500}]}]})
    )
    size = len(line("k2", {"contents": [{"parts": [{"text": "x" * 500}]}]})) + 1

    assert problems_of("batch/a.jsonl", limits=SplitLimits(max_bytes=200)) == [
        f"batch/a.jsonl:2: line 2 is {size} bytes; one request cannot exceed the task size "
        "limit (200 bytes)"
    ]


def test_huge_line_is_reported_without_being_held_in_memory(batch: Path) -> None:
    """A line longer than a read block and the limit is skipped, not accumulated."""
    huge = line("k2", {"contents": [{"parts": [{"text": "x" * (9 * 1024 * 1024)}]}]})
    write(batch / "a.jsonl", line("k1"), huge, line("k3"), line("k3"))

    assert problems_of("batch/a.jsonl", limits=SplitLimits(max_bytes=1024 * 1024)) == [
        f"batch/a.jsonl:2: line 2 is {len(huge) + 1} bytes; one request cannot exceed the task "
        f"size limit ({1024 * 1024} bytes)",
        'batch/a.jsonl:4: duplicate key "k3" (first on line 3); keys must be unique',
    ]


def test_problem_str_without_a_line() -> None:
    assert str(InputProblem("a.jsonl", None, "boom")) == "a.jsonl: boom"
    assert str(InputProblem("a.jsonl", 3, "boom")) == "a.jsonl:3: boom"


def test_estimate_tokens_is_about_a_quarter_of_the_bytes() -> None:
    assert estimate_tokens(b"") == 1
    assert estimate_tokens(b"abcd") == 1
    assert estimate_tokens(b"abcde") == 2
    assert estimate_tokens("解释".encode()) == 2  # 6 bytes: a little high, on purpose


def test_split_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SplitLimits(max_bytes=0)
    with pytest.raises(ValueError):
        SplitLimits(max_requests=-1)
