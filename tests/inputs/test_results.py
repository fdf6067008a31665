"""Gemini output files: verified key by key, merged across retries, joined to the inputs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gembatch.results import (
    _fast_path,
    classify_record,
    failed_keys,
    join_results,
    merge_results,
    parse_result_line,
    summarize_usage,
    verify_output,
)


def response(text: str = "hi", prompt: int = 3, output: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}
        ],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "totalTokenCount": prompt + output,
        },
        **extra,
    }


def ok_line(key: str, text: str = "hi", key_first: bool = True, compact: bool = True) -> str:
    body: dict[str, Any] = {"response": response(text)}
    record = {"key": key, **body} if key_first else {**body, "key": key}
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(record, ensure_ascii=False, separators=separators)


def error_line(
    key: str, code: int = 3, message: str = "bad request", key_first: bool = True
) -> str:
    body = {"error": {"code": code, "message": message}}
    record = {"key": key, **body} if key_first else {**body, "key": key}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write(path: Path, lines: list[str], newline_at_end: bool = True) -> Path:
    path.write_bytes(("\n".join(lines) + ("\n" if newline_at_end else "")).encode())
    return path


def keys(n: int) -> list[str]:
    return [f"k{i}" for i in range(1, n + 1)]


# -- verify_output ------------------------------------------------------------------------


def test_complete_file_in_any_order_and_shape_is_ok(tmp_path: Path) -> None:
    lines = [
        ok_line("k3", key_first=False),
        error_line("k1"),
        ok_line("k2", compact=False),
        "",
        error_line("k4", key_first=False),
    ]
    path = write(tmp_path / "out.jsonl", lines)

    report = verify_output(path, ["k1", "k2", "k3", "k4"])

    assert report.ok
    assert (report.lines, report.succeeded, report.failed) == (4, 2, 2)
    assert report.describe() == "results complete: 4 lines, 2 succeeded, 2 failed"


def test_missing_keys_are_counted_and_listed_in_input_order(tmp_path: Path) -> None:
    expected = keys(50)
    path = write(tmp_path / "out.jsonl", [ok_line(k) for k in expected[::2]])

    report = verify_output(path, expected)

    assert not report.ok
    assert report.missing_count == 25
    assert report.missing == expected[1::2][:20]
    assert report.describe() == (
        "results incomplete: 25 of 50 keys missing (k2, k4, k6, k8, k10, ...)"
    )


def test_duplicate_and_unexpected_keys(tmp_path: Path) -> None:
    lines = [ok_line("k1"), ok_line("k2"), error_line("k1"), ok_line("stray")]
    path = write(tmp_path / "out.jsonl", lines)

    report = verify_output(path, {"k1", "k2"})

    assert not report.ok
    assert (report.duplicates, report.unexpected, report.missing) == (["k1"], ["stray"], [])
    assert (report.succeeded, report.failed, report.lines) == (2, 0, 4)
    assert report.describe() == (
        "results incomplete: 1 duplicate keys (k1); 1 keys not in the input (stray)"
    )


def test_unparseable_lines_are_reported_by_line_number(tmp_path: Path) -> None:
    lines = [ok_line("k1"), "garbage", "", '{"key": "k2"}', '{"response": {}}', ok_line("k3")]
    path = write(tmp_path / "out.jsonl", lines)

    report = verify_output(path, keys(3))

    assert report.unparseable == [2, 4, 5]
    assert report.missing == ["k2"]
    assert report.describe() == (
        "results incomplete: 1 of 3 keys missing (k2); 3 unreadable lines (line 2, 4, 5)"
    )


def test_file_cut_mid_line_is_torn(tmp_path: Path) -> None:
    data = ("\n".join(ok_line(k) for k in keys(3)) + "\n").encode()
    path = tmp_path / "out.jsonl"
    # Cut right after an inner '}', where a cut line looks most like a whole one.
    cut = data.rindex(b"}", 0, len(data) - 2) + 1
    path.write_bytes(data[:cut])
    assert data[:cut].endswith(b"}}") and not data[:cut].endswith(b"}}}")
    assert _fast_path(data[:cut], 0, cut) is not None  # it would fool the fast path

    report = verify_output(path, keys(3))

    assert report.torn and not report.ok
    assert report.missing == ["k3"] and report.unparseable == []
    assert report.describe().endswith("the file ends in the middle of a line (cut short)")


def test_complete_last_line_without_newline_is_not_torn(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", [ok_line(k) for k in keys(3)], newline_at_end=False)

    report = verify_output(path, keys(3))

    assert report.ok and not report.torn


def test_escaped_and_unicode_keys(tmp_path: Path) -> None:
    expected = ['quo"te', "back\\slash", "tab\there", "ユニコード", "emoji 🎉", "", "\u2028"]
    lines = [ok_line(k) for k in expected[:4]]
    lines += [json.dumps({"response": response(), "key": k}) for k in expected[4:]]  # \u escapes
    path = write(tmp_path / "out.jsonl", lines)

    report = verify_output(path, expected)

    assert report.ok, report.describe()


def test_response_text_that_looks_like_members_does_not_fool_the_reader(tmp_path: Path) -> None:
    tricky = 'the answer: {"key":"x", "error": {"code": 1}} and "error":'
    lines = [ok_line("real", text=tricky), ok_line("last", text=tricky, key_first=False)]
    nested = {"response": response(functionCall={"args": {"key": "inner", "error": "e"}})}
    lines.append(json.dumps({**nested, "key": "nested"}))
    path = write(tmp_path / "out.jsonl", lines)

    report = verify_output(path, ["real", "last", "nested"])

    assert report.ok and report.failed == 0, report.describe()
    for raw in lines:
        assert parse_result_line(raw.encode()) == classify_record(json.loads(raw))


def test_error_null_is_a_response_as_json_says(tmp_path: Path) -> None:
    line = json.dumps({"key": "k1", "error": None, "response": response()})
    assert parse_result_line(line.encode()) == ("k1", False)


# -- the fast path agrees with json.loads -------------------------------------------------

names = st.sampled_from(["key", "error", "response", "text", "parts", "code"]) | st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.sampled_from(['"key":"x"', '"error":', "\\", '\\"error\\":', "}", '"}'])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=12,
)


@st.composite
def result_lines(draw: st.DrawFn) -> bytes:
    key = draw(st.text())
    if draw(st.booleans()):
        outcome = ("response", draw(st.dictionaries(names, json_values, max_size=4)))
    else:
        error = {"code": draw(st.integers(0, 20)), "message": draw(st.text())}
        outcome = ("error", error)
    members = [("key", key), outcome]
    if draw(st.booleans()):
        members.append(("metadata", draw(json_values)))
    order = draw(st.permutations(members))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (",", ": "), (", ", ":")]))
    text = json.dumps(dict(order), ensure_ascii=draw(st.booleans()), separators=separators)
    return (text + draw(st.sampled_from(["", "\n", "\r\n"]))).encode()


@settings(max_examples=400, deadline=None)
@given(result_lines())
def test_fast_path_agrees_with_json_loads(line: bytes) -> None:
    truth = classify_record(json.loads(line))
    assert truth is not None
    fast = _fast_path(line, 0, len(line))
    assert fast is None or fast == truth
    assert parse_result_line(line) == truth


@settings(max_examples=200, deadline=None)
@given(key=st.text(), failed=st.booleans(), key_first=st.booleans(), text=st.text())
def test_fast_path_takes_the_shapes_gemini_writes(
    key: str, failed: bool, key_first: bool, text: str
) -> None:
    line = (
        error_line(key, message=text, key_first=key_first)
        if failed
        else ok_line(key, text, key_first)
    )
    assert _fast_path(line.encode(), 0, len(line.encode())) == (key, failed)


# -- merge, failed keys, usage ------------------------------------------------------------


def test_merge_replaces_retried_error_lines_and_keeps_one_line_per_key(tmp_path: Path) -> None:
    task0 = write(tmp_path / "t0.jsonl", [ok_line("k1"), error_line("k2"), error_line("k3")])
    task1 = write(tmp_path / "t1.jsonl", [error_line("k5"), ok_line("k4")], newline_at_end=False)
    retry1 = write(tmp_path / "r1.jsonl", [ok_line("k2", "second try"), error_line("k3", 13)])
    retry2 = write(tmp_path / "r2.jsonl", [error_line("k3", 14), error_line("k5", 15)])
    retry3 = write(tmp_path / "r3.jsonl", [ok_line("k5", "finally"), error_line("k2", 16)])
    dest = tmp_path / "results" / "out.jsonl"  # its directory is created

    summary = merge_results([task0, task1, retry1, retry2, retry3], dest)

    data = dest.read_text()
    assert data.endswith("\n") and "\n\n" not in data
    records = {r["key"]: r for r in map(json.loads, data.splitlines())}
    assert len(data.splitlines()) == len(records) == 5
    assert records["k1"]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "hi"
    # k2 succeeded in retry1; a later error does not undo that.
    assert records["k2"]["response"]["candidates"][0]["content"]["parts"][0]["text"] == (
        "second try"
    )
    assert records["k3"]["error"]["code"] == 14  # the last error
    assert records["k4"]["response"]
    assert records["k5"]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "finally"
    assert (summary.lines, summary.succeeded, summary.failed) == (5, 4, 1)
    assert verify_output(dest, keys(5)).ok
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.jsonl"]  # no temp left


def test_merge_keeps_a_first_task_success_over_a_later_error(tmp_path: Path) -> None:
    task0 = write(tmp_path / "t0.jsonl", [ok_line("k1", "kept"), ok_line("k2")])
    retry = write(tmp_path / "r.jsonl", [error_line("k1")])

    summary = merge_results([task0, retry], tmp_path / "out.jsonl")

    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["k1", "k2"]
    assert "kept" in lines[0]
    assert (summary.succeeded, summary.failed) == (2, 0)


def test_merge_into_the_results_file_it_reads(tmp_path: Path) -> None:
    results = write(tmp_path / "out.jsonl", [ok_line("k1"), error_line("k2")])
    retry = write(tmp_path / "r.jsonl", [ok_line("k2", "fixed")])

    merge_results([results, retry], results)

    assert failed_keys(results) == []
    assert verify_output(results, ["k1", "k2"]).ok


def test_merge_refuses_a_part_that_was_not_verified(tmp_path: Path) -> None:
    task0 = write(tmp_path / "t0.jsonl", [ok_line("k1"), "garbage"])
    dest = tmp_path / "out.jsonl"
    dest.write_text("previous\n")

    try:
        merge_results([task0], dest)
    except ValueError as exc:
        assert f"{task0}:2:" in str(exc)
    else:
        raise AssertionError("merge accepted an unreadable line")
    assert dest.read_text() == "previous\n"


def test_failed_keys_in_file_order(tmp_path: Path) -> None:
    lines = [error_line("b"), ok_line("a"), error_line("c", key_first=False), error_line("a2")]
    path = write(tmp_path / "out.jsonl", lines)

    assert failed_keys(path) == ["b", "c", "a2"]


def test_summarize_usage_adds_up_every_response(tmp_path: Path) -> None:
    thinking = response(prompt=10, output=20)
    thinking["usageMetadata"].update(thoughtsTokenCount=7, cachedContentTokenCount=4)
    lines = [
        ok_line("k1"),
        json.dumps({"key": "k2", "response": thinking}),
        error_line("k3"),
    ]
    path = write(tmp_path / "out.jsonl", lines)

    assert summarize_usage(path) == {
        "promptTokenCount": 13,
        "candidatesTokenCount": 25,
        "thoughtsTokenCount": 7,
        "totalTokenCount": 38,
        "cachedContentTokenCount": 4,
    }


# -- join_results -------------------------------------------------------------------------


def write_inputs(path: Path, input_keys: list[str]) -> Path:
    lines = [
        json.dumps({"key": k, "request": {"contents": [{"parts": [{"text": k}]}]}})
        for k in input_keys
    ]
    return write(path, lines)


def test_join_jsonl_gives_one_record_per_input_line_in_input_order(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", ["a", "b", "c", "d"])
    thought = response("answer")
    thought["candidates"][0]["content"]["parts"].insert(0, {"text": "thinking", "thought": True})
    thought["candidates"][0]["content"]["parts"].append({"text": " more"})
    lines = [
        error_line("c", 13, "internal"),
        json.dumps({"response": thought, "key": "a"}),
        ok_line("b", "plain"),
    ]
    results = write(tmp_path / "out.jsonl", lines)
    out = io.StringIO()

    summary = join_results(inputs, results, out)

    records = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["key"] for r in records] == ["a", "b", "c", "d"]
    assert records[0] == {
        "key": "a",
        "status": "succeeded",
        "text": "answer more",
        "finish_reason": "STOP",
        "error": None,
        "usage": {"promptTokenCount": 3, "candidatesTokenCount": 5, "totalTokenCount": 8},
    }
    assert records[1]["text"] == "plain"
    assert records[2] == {
        "key": "c",
        "status": "failed",
        "text": None,
        "finish_reason": None,
        "error": {"code": 13, "message": "internal"},
        "usage": None,
    }
    assert records[3]["status"] == "missing" and records[3]["text"] is None
    assert (summary.succeeded, summary.failed, summary.missing) == (2, ["c"], ["d"])


def test_join_csv_has_a_header_and_flat_columns(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", ["a", "b", "c"])
    thinking = response("line 1,\nline 2", prompt=4, output=6)
    thinking["usageMetadata"]["thoughtsTokenCount"] = 10
    thinking["usageMetadata"]["totalTokenCount"] = 20
    lines = [json.dumps({"key": "a", "response": thinking}), error_line("b", 3, "no")]
    results = write(tmp_path / "out.jsonl", lines)
    out = io.StringIO()

    join_results(inputs, results, out, fmt="csv")

    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows == [
        [
            "key",
            "status",
            "text",
            "finish_reason",
            "error_code",
            "error_message",
            "prompt_tokens",
            "output_tokens",
            "total_tokens",
        ],
        ["a", "succeeded", "line 1,\nline 2", "STOP", "", "", "4", "16", "20"],
        ["b", "failed", "", "", "3", "no", "", "", ""],
        ["c", "missing", "", "", "", "", "", "", ""],
    ]


def test_join_without_a_results_file_marks_everything_missing(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", ["a", "b"])

    for results in (None, tmp_path / "never-downloaded.jsonl"):
        out = io.StringIO()
        summary = join_results(inputs, results, out)
        assert summary.missing == ["a", "b"] and summary.succeeded == 0
        assert [json.loads(x)["status"] for x in out.getvalue().splitlines()] == [
            "missing",
            "missing",
        ]


def test_join_prefers_a_success_when_a_key_appears_twice(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.jsonl", ["a"])
    results = write(tmp_path / "out.jsonl", [ok_line("a", "good"), error_line("a")])
    out = io.StringIO()

    join_results(inputs, results, out)

    assert json.loads(out.getvalue())["text"] == "good"
