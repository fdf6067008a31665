"""JsonlLedger in one process: records, ids, byte-exact lines, bad lines kept and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gembatch.ledger import Ledger, LedgerFileError, derive_id
from gembatch.ledger.jsonl import JsonlLedger
from tests.ledger.conftest import Unprivileged

LEGACY_LINE = (
    b'{"input_file": "1-simple/batch_requests.jsonl", "job_name": "batches/abc", '
    b'"uploaded_file_name": "files/up1", "display_name": "batch-job-batch_requests", '
    b'"created_at": "2025-07-13T01:01:38.807581", "completed_at": "2025-07-13T01:03:03.448724", '
    b'"final_state": "JOB_STATE_SUCCEEDED", "duration_seconds": 84}'
)
# The original tool wrote compact or spaced JSON, in any key order: keep those bytes.
CURRENT_LINE = (
    b'{"input_file":"2.jsonl","count":5,"uploaded_file_name":"files/up2",'
    b'"batch":{"name":"batches/def","state":"JOB_STATE_PENDING"},"x-unknown":[1,2]}'
)


def job(n: int, **extra: object) -> dict:
    return {"id": f"job-{n}", "input_file": f"in/{n}.jsonl", "count": n, **extra}


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def test_jsonl_ledger_implements_the_ledger_interface(tmp_path: Path) -> None:
    assert isinstance(JsonlLedger(tmp_path / "job-info.jsonl"), Ledger)


def test_missing_ledger_is_empty_and_created_by_the_first_add(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    ledger = JsonlLedger(path)
    snapshot = ledger.load()
    assert snapshot.records == [] and snapshot.problems == []
    assert not path.exists()
    assert ledger.add(job(1))
    assert json.loads(path.read_text()) == job(1)


def test_add_refuses_a_second_record_with_the_same_id_without_writing(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "job-info.jsonl")
    assert ledger.add(job(1))
    before = ledger.path.read_bytes()
    assert not ledger.add(job(1, count=99))
    assert ledger.writes == 1
    assert ledger.path.read_bytes() == before


def test_find_by_input_batch_and_id_return_copies(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "job-info.jsonl")
    ledger.add(job(1, batch={"name": "batches/one"}))
    ledger.add(job(2, tasks=[{"batch": {"name": "batches/t1"}}, {"batch": {"name": "batches/t2"}}]))
    assert ledger.find_by_input("in/1.jsonl")["id"] == "job-1"
    assert ledger.find_by_input("./in/2.jsonl")["id"] == "job-2"
    assert ledger.find_by_batch("batches/one")["id"] == "job-1"
    assert ledger.find_by_batch("batches/t2")["id"] == "job-2"
    assert ledger.find_by_batch("batches/none") is None
    found = ledger.find_by_id("job-1")
    found["count"] = 1000
    assert ledger.find_by_id("job-1")["count"] == 1
    assert ledger.find_by_id("job-3") is None


def test_update_many_replaces_whole_records_and_keeps_other_lines_byte_for_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b'{"id":"a","count":1,"old":true}\n{"id":"b",   "count":2}\n')
    ledger = JsonlLedger(path)
    assert ledger.update_many([{"id": "a", "count": 10}, {"id": "zzz", "count": 0}]) == 1
    assert lines_of(path) == [b'{"id": "a", "count": 10}', b'{"id":"b",   "count":2}', b""]


def test_update_many_of_unchanged_records_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(CURRENT_LINE + b"\n")
    ledger = JsonlLedger(path)
    assert ledger.update_many(ledger.load().records) == 1
    assert ledger.writes == 0
    assert path.read_bytes() == CURRENT_LINE + b"\n"


def test_updating_1000_of_10000_jobs_is_one_write(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b"".join(json.dumps(job(n)).encode() + b"\n" for n in range(10_000)))
    ledger = JsonlLedger(path)
    records = ledger.load().records
    changed = [{**record, "final_state": "JOB_STATE_SUCCEEDED"} for record in records[::10]]
    assert ledger.update_many(changed) == 1000
    assert ledger.writes == 1
    after = ledger.load().records
    assert sum(1 for r in after if r.get("final_state") == "JOB_STATE_SUCCEEDED") == 1000
    assert len(after) == 10_000


def test_records_without_id_get_a_stable_derived_id_persisted_only_when_rewritten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(LEGACY_LINE + b"\n" + CURRENT_LINE + b"\n")
    ledger = JsonlLedger(path)
    snapshot = ledger.load()
    legacy, current = snapshot.records
    assert legacy["id"] == "legacy-" + _sha("1-simple/batch_requests.jsonl\0batches/abc")
    assert current["id"] == derive_id(json.loads(CURRENT_LINE))
    assert snapshot.derived_ids == {legacy["id"], current["id"]}
    assert JsonlLedger(path).load().records == snapshot.records  # stable across processes
    assert path.read_bytes() == LEGACY_LINE + b"\n" + CURRENT_LINE + b"\n"  # not written

    current["count"] = 6
    assert ledger.update_many([current]) == 1
    first, second, _ = lines_of(path)
    assert first == LEGACY_LINE
    assert json.loads(second) == current  # the id is now stored, with every other field
    assert ledger.load().derived_ids == {legacy["id"]}


def test_a_record_found_by_derived_id_can_be_updated_without_naming_the_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(CURRENT_LINE + b"\n")
    ledger = JsonlLedger(path)
    record = json.loads(CURRENT_LINE)
    record["batch"]["state"] = "JOB_STATE_RUNNING"
    assert ledger.update_many([record]) == 1  # matched through the derived id
    assert ledger.find_by_batch("batches/def")["batch"]["state"] == "JOB_STATE_RUNNING"


def test_unknown_keys_and_non_ascii_text_are_preserved(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "job-info.jsonl")
    record = job(1, note="日本語のメモ", nested={"deep": [1, {"x": None}]}, **{"x-future": True})
    ledger.add(record)
    ledger.update_many([{**record, "count": 2}])
    assert ledger.find_by_id("job-1") == {**record, "count": 2}
    assert "日本語のメモ".encode() in ledger.path.read_bytes()  # readable, not \\u escapes


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        (b'{"id": "x", "count": ', "not valid JSON"),
        (b'{"input_file": "caf\xe9.jsonl"}', "not UTF-8"),
        (b"[1, 2, 3]", "a JSON list is not a job record"),
        (b'"just a string"', "a JSON str is not a job record"),
        (b'{"id": 42}', '"id" must be a non-empty string'),
        (b"\x00\x01\x02binary", "not valid JSON"),
    ],
)
def test_a_corrupted_line_survives_10_rewrites_and_is_reported_each_time(
    tmp_path: Path, bad_line: bytes, what: str
) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(json.dumps(job(1)).encode() + b"\n" + bad_line + b"\n")
    for n in range(10):
        ledger = JsonlLedger(path)  # a fresh reader each time, as separate commands would be
        snapshot = ledger.load()
        assert [(p.line, p.raw) for p in snapshot.problems] == [(2, bad_line)]
        assert what in snapshot.problems[0].message
        assert "by hand" in snapshot.problems[0].message  # it says what to do
        ledger.update_many([job(1, count=100 + n)])
        ledger.add(job(10 + n))
        assert lines_of(path)[1] == bad_line
    final = JsonlLedger(path).load()
    assert len(final.records) == 11
    assert [p.line for p in final.problems] == [2]


def test_duplicate_ids_keep_the_first_and_report_the_second(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b'{"id": "a", "count": 1}\n{"id": "a", "count": 2}\n')
    ledger = JsonlLedger(path)
    snapshot = ledger.load()
    assert snapshot.records == [{"id": "a", "count": 1}]
    assert snapshot.problems[0].line == 2
    assert "duplicate id 'a' (first on line 1)" in snapshot.problems[0].message
    ledger.update_many([{"id": "a", "count": 3}])
    assert lines_of(path) == [b'{"id": "a", "count": 3}', b'{"id": "a", "count": 2}', b""]


def test_blank_lines_crlf_and_a_missing_final_newline_are_handled(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b'{"id": "a"}\r\n\n   \n{"id": "b"}')
    ledger = JsonlLedger(path)
    snapshot = ledger.load()
    assert [r["id"] for r in snapshot.records] == ["a", "b"]
    assert snapshot.lines == [1, 4]
    assert snapshot.problems == []
    ledger.add({"id": "c"})
    assert path.read_bytes() == b'{"id": "a"}\r\n\n   \n{"id": "b"}\n{"id": "c"}\n'


def test_a_utf8_bom_on_the_first_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n')
    assert JsonlLedger(path).load().records == [{"id": "a"}]


def test_a_change_by_another_process_is_seen_even_with_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    ledger = JsonlLedger(path)
    ledger.add(job(1, state="AAAA"))
    assert ledger.find_by_id("job-1")["state"] == "AAAA"
    code = (
        "import sys; from gembatch.ledger.jsonl import JsonlLedger; "
        "JsonlLedger(sys.argv[1]).update_many([{**JsonlLedger(sys.argv[1]).find_by_id('job-1'),"
        " 'state': 'BBBB'}])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert ledger.find_by_id("job-1")["state"] == "BBBB"
    assert ledger.add(job(2))
    assert [r["state"] for r in ledger.load().records if "state" in r] == ["BBBB"]


def test_a_directory_path_gives_a_clear_ledger_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerFileError, match="is a directory, not a ledger file"):
        JsonlLedger(tmp_path).load()
    with pytest.raises(LedgerFileError, match="is a directory, not a ledger file"):
        JsonlLedger(tmp_path).add({"id": "x"})
    assert not Path(f"{tmp_path}.lock").exists()  # no lock file dropped beside it


def test_reading_a_ledger_in_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "nowhere" / "job-info.jsonl")
    assert ledger.load().records == []
    assert ledger.find_by_id("job-1") is None
    assert list(tmp_path.iterdir()) == []
    assert ledger.add(job(1))  # the first write creates the directory
    assert ledger.load().records == [job(1)]


READ_THEN_ADD = """
import json, sys
from gembatch.ledger import LedgerFileError
from gembatch.ledger.jsonl import JsonlLedger
print(json.dumps(JsonlLedger(sys.argv[1]).load().records))
try:
    JsonlLedger(sys.argv[1]).add({"id": "job-2"})
except LedgerFileError as exc:
    print(exc)
else:
    print("added")
"""


def test_a_read_only_directory_can_still_be_read(unprivileged: Unprivileged) -> None:
    directory = unprivileged.directory / "ledgers"
    directory.mkdir()
    path = directory / "job-info.jsonl"
    path.write_bytes(json.dumps(job(1)).encode() + b"\n")
    before = path.read_bytes()
    os.chown(directory, unprivileged.uid, unprivileged.gid)  # the user's own directory...
    directory.chmod(0o555)  # ...which it may not write in
    try:
        result = subprocess.run(
            unprivileged.command(sys.executable, "-c", READ_THEN_ADD, str(path)),
            capture_output=True,
            text=True,
            env=unprivileged.env(),
            cwd=unprivileged.directory,
            timeout=60,
        )
    finally:
        directory.chmod(0o755)
    assert result.returncode == 0, result.stderr
    loaded, refused = result.stdout.splitlines()
    assert json.loads(loaded) == [job(1)]
    assert refused.startswith(f"cannot lock {path}: Permission denied")
    assert "check the file and directory permissions" in refused
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["job-info.jsonl"]  # no lock file


def test_records_that_json_cannot_encode_are_refused_before_any_write(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "job-info.jsonl")
    ledger.add(job(1))
    before = ledger.path.read_bytes()
    with pytest.raises(TypeError):
        ledger.update_many([job(1, when=object())])
    with pytest.raises(ValueError, match='"id" must be a non-empty string'):
        ledger.add({"id": 7})
    assert ledger.path.read_bytes() == before


def test_the_lock_file_names_its_holder(tmp_path: Path) -> None:
    ledger = JsonlLedger(tmp_path / "job-info.jsonl")
    ledger.add(job(1))
    holder = json.loads(ledger.lock_path.read_text())
    assert holder["pid"] == os.getpid()
    assert holder["host"] and holder["since"] and holder["command"]


# -- property: whatever the lines, rewriting keeps what it did not change ----------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
record_lines = st.builds(
    lambda n, extra: json.dumps({"id": f"r{n}", **extra}, ensure_ascii=n % 2 == 0).encode(),
    st.integers(0, 10_000),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "id"), json_values, max_size=3),
)
garbage_lines = st.binary(max_size=20).filter(lambda b: b"\n" not in b)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(record_lines | garbage_lines, max_size=12),
    final_newline=st.booleans(),
    data=st.data(),
)
def test_rewrites_keep_every_line_they_did_not_change(
    tmp_path: Path, lines: list[bytes], final_newline: bool, data: st.DataObject
) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if final_newline and lines else b""))
    ledger = JsonlLedger(path)
    before = ledger.load()
    chosen = []
    if before.records:
        chosen = data.draw(st.lists(st.sampled_from(before.records), unique_by=lambda r: r["id"]))
    updates = [{**record, "touched": True} for record in chosen]
    ledger.update_many(updates)
    after = ledger.load()

    touched = {record["id"] for record in updates}
    expected = [
        {**record, "touched": True} if record["id"] in touched else record
        for record in before.records
    ]
    assert after.records == expected
    assert [(p.line, p.raw) for p in after.problems] == [(p.line, p.raw) for p in before.problems]
    if touched:
        new_lines = path.read_bytes().split(b"\n")[:-1]
        for index, raw in enumerate(lines[: len(new_lines)]):
            line_no = index + 1
            record_here = [
                r for r, n in zip(before.records, before.lines, strict=True) if n == line_no
            ]
            if not record_here or record_here[0]["id"] not in touched:
                assert new_lines[index] == raw


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
