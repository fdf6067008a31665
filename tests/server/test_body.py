"""The reader of client JSON (gembatch.server.body), in-process: the surrogate guard
agrees with Python's own reading of JSON however the bytes arrive, requests come out as
JSONL lines equal to what was sent, and each limit is a refusal naming the field.
The service-level cases (real processes, both databases) are in test_hostile_input.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gembatch.server import body

# Pieces of a JSON string literal: escapes of whole pairs and of halves, escaped
# backslashes (after which "ud800" is plain text), plain text.
PIECES = ["a", "é", "\\\\", "\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ud83d\\ude00",
          "\\u0041", "u", "d800", "\\\\u", "\\n"]  # fmt: skip


def read_to(raw: bytes, target: Path) -> Any:
    """A create body as the service reads it: through the guard, requests to `target`."""
    guard = body.SurrogateGuard()
    spooled = guard.feed(raw) + guard.finish()
    return body.read(
        io.BytesIO(spooled), guard=guard, requests_at=("requests",), requests_file=target
    )


def _half_pair(text: str) -> bool:
    try:
        json.loads(text)[0].encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=12),
    cuts=st.lists(st.integers(1, 9), max_size=20),
)
def test_the_surrogate_guard_agrees_with_python_json_however_the_bytes_arrive(
    pieces: list[str], cuts: list[int]
) -> None:
    text = '["' + "".join(pieces) + '"]'
    raw = text.encode()
    guard, out, at = body.SurrogateGuard(), b"", 0
    for size in cuts:
        out += guard.feed(raw[at : at + size])
        at += size
    out += guard.feed(raw[at:]) + guard.finish()
    if _half_pair(text):
        assert guard.found is not None
        with pytest.raises(body.BodyRefused) as refused:
            body.read(io.BytesIO(out), guard=guard)
        assert "surrogate pair" in json.dumps(refused.value.detail)
    else:
        assert guard.found is None and out == raw
        assert body.read(io.BytesIO(out), guard=guard) == json.loads(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63) + 1, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(JSON_VALUES, min_size=1, max_size=5), ascii_only=st.booleans())
def test_requests_come_out_as_jsonl_lines_equal_to_what_was_sent(
    tmp_path_factory: pytest.TempPathFactory, requests: list[Any], ascii_only: bool
) -> None:
    items = [{"key": f"k{n}", "request": {"contents": value}} for n, value in enumerate(requests)]
    items.append({"request": {"x": requests[0]}})  # no key: the n-th is `request-n`
    text = json.dumps({"requests": items, "model": "m"}, ensure_ascii=ascii_only)
    target = tmp_path_factory.mktemp("spill") / "job.jsonl"
    document = read_to(text.encode(), target)
    assert document == {"requests": body.Spilled(len(items)), "model": "m"}
    written = [json.loads(line) for line in target.read_text("utf-8").split("\n")[:-1]]
    items[-1] = {"key": f"request-{len(items)}", **items[-1]}
    assert written == items


@pytest.mark.parametrize(
    ("text", "status", "loc"),
    [
        ('{"requests": [{"request": {}}], "metadata": {"a": [' + "[" * 99 + "]" * 99 + "]}}",
         422, ["body", "metadata", "a", 0]),
        ('{"requests": [{"key": "k", "request": {"a": ' + "[" * 97 + "]" * 97 + "}}]}",
         422, ["body", "requests", 0, "request", "a"]),
        ('{"priority": 9223372036854775808}', 422, ["body", "priority"]),
        ('{"priority": -9223372036854775808}', 422, ["body", "priority"]),
        ('{"metadata": {"a": [1, 2, 1e400]}}', 422, ["body", "metadata", "a", 2]),
        ('{"metadata": {"a": [1, NaN]}}', 422, ["body", "metadata", "a", 1]),
        ('{"metadata": {"a": {"b": "\\u0000"}}}', 422, ["body", "metadata", "a", "b"]),
        ('{"requests": [{"key": "' + "k" * 513 + '", "request": {}}]}', 422,
         ["body", "requests", 0, "key"]),
        ('{"requests": [{"key": "k", "request": {}, "extra": 1}]}', 422,
         ["body", "requests", 0, "extra"]),
        ('{"requests": [{"key": "k"}]}', 422, ["body", "requests", 0, "request"]),
        ('{"requests": [7]}', 422, ["body", "requests", 0]),
        ('{"requests": [], "requests": []}', 422, ["body", "requests"]),
        ('{"a": 1} {"b": 2}', 400, None),
        ("", 400, None),
        ('{"a": "\xff"}', 400, None),
    ],
)  # fmt: skip
def test_each_limit_is_a_refusal_naming_the_field_and_writes_nothing(
    tmp_path: Path, text: str, status: int, loc: list[Any] | None
) -> None:
    target = tmp_path / "job.jsonl"
    raw = text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1")
    with pytest.raises(body.BodyRefused) as refused:
        read_to(raw, target)
    assert refused.value.status == status
    if loc is not None:
        assert refused.value.detail[0]["loc"][: len(loc)] == loc
    assert not target.exists()


def test_what_is_within_the_limits_is_read_whole(tmp_path: Path) -> None:
    deep = "[" * 98 + "]" * 98  # 100 levels with the body and metadata
    text = (
        '{"priority": 9223372036854775807, "metadata": {"a": ' + deep + ', "b": "\\\\ud800",'
        ' "c": "\\ud83d\\ude00", "d": -9223372036854775807, "e": 1e-400}}'
    )
    document = read_to(text.encode(), tmp_path / "job.jsonl")
    assert document == json.loads(text)
