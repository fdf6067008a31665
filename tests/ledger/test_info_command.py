"""`gembatch info LEDGER` as a user runs it: a real process, and a real emulator for the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.ledger.jsonl import AtomicJobManager, JsonlLedger
from tests.ledger.conftest import Unprivileged

REQUEST = {"key": "k1", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}


def run_info(
    ledger: Path | str,
    *extra: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    local: bool = False,
    as_user: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`gembatch info` in a process of its own; `as_user`: a prefix that runs it as
    another user (the `unprivileged` fixture's)."""
    base = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    base.pop("GOOGLE_GEMINI_BASE_URL", None)
    command = [*(as_user or []), sys.executable, "-m", "gembatch"]
    command += [*(["--local"] if local else []), "info"]
    return subprocess.run(
        [*command, *extra, str(ledger)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=120,
    )


def stdout_records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(data)
    return data


def current(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "input_file": f"in/{n}.jsonl",
        "count": 2,
        "uploaded_file_name": f"files/up{n}",
        "batch": {"name": f"batches/b{n}", "state": "JOB_STATE_SUCCEEDED"},
        **extra,
    }


def legacy(input_file: str, job_name: str, uploaded: str = "files/up-legacy") -> dict[str, Any]:
    return {
        "input_file": input_file,
        "job_name": job_name,
        "uploaded_file_name": uploaded,
        "display_name": "batch-job-legacy",
        "created_at": "2025-07-13T01:01:38.807581",
        "completed_at": "2025-07-13T01:03:03.448724",
        "final_state": "JOB_STATE_SUCCEEDED",
        "duration_seconds": 84,
    }


# -- bad input: clear message, non-zero exit, never a traceback --------------------------


def test_info_on_a_missing_ledger_says_so_and_exits_2(tmp_path: Path) -> None:
    result = run_info(tmp_path / "job-info.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no such ledger file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "job-info.jsonl").exists()
    assert not (tmp_path / "job-info.jsonl.lock").exists()


def test_info_on_a_directory_says_so_and_exits_2(tmp_path: Path) -> None:
    result = run_info(tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    assert "is a directory, not a ledger file" in result.stderr
    assert "Traceback" not in result.stderr


def test_info_on_an_unreadable_ledger_says_so_and_exits_2(unprivileged: Unprivileged) -> None:
    path = unprivileged.directory / "job-info.jsonl"
    before = write_jsonl(path, [current(1)])
    path.chmod(0)
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    # As a user runs it: in the ledger's directory, by its relative name.
    result = run_info(path.name, cwd=unprivileged.directory, env=env, as_user=unprivileged.prefix)
    assert result.returncode == 2
    assert result.stdout == ""
    # The ledger code's own message (what to do included), not typer's "is not readable".
    assert result.stderr == (
        "error: cannot read job-info.jsonl: Permission denied; check its permissions\n"
    )
    path.chmod(0o644)
    assert path.read_bytes() == before


def _as_user(unprivileged: Unprivileged, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in unprivileged.env().items() if k not in ("GEMINI_API_KEY",)}
    base.pop("GOOGLE_GEMINI_BASE_URL", None)
    return subprocess.run(
        unprivileged.command(sys.executable, "-m", "gembatch", *args),
        capture_output=True,
        text=True,
        cwd=unprivileged.directory,
        env={**base, "COLUMNS": "160"},
        timeout=120,
    )


def test_an_unreadable_default_ledger_breaks_no_command_that_does_not_read_it(
    unprivileged: Unprivileged,
) -> None:
    directory = unprivileged.directory
    write_jsonl(directory / "job-info.jsonl", [current(1)])
    (directory / "job-info.jsonl").chmod(0)
    write_jsonl(directory / "other.jsonl", [current(2)])
    (directory / "other.jsonl").chmod(0o644)

    # Another ledger, given either way, and commands that read no ledger at all.
    for args in (["info", "other.jsonl"], ["--job-info", "other.jsonl", "info"]):
        shown = _as_user(unprivileged, *args)
        assert shown.returncode == 0, (args, shown.stderr)
        assert [r["input_file"] for r in stdout_records(shown)] == ["in/2.jsonl"]
    listed = _as_user(unprivileged, "--job-info", "other.jsonl", "status", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["input_file"] for j in json.loads(listed.stdout)] == ["in/2.jsonl"]
    for args in (["--help"], ["emulator", "--help"], ["serve", "--help"], ["--version"]):
        helped = _as_user(unprivileged, *args)
        assert helped.returncode == 0, (args, helped.stderr)
        assert "not readable" not in helped.stdout + helped.stderr

    # The commands that do read it say so in the ledger's words, never typer's.
    for args in (["info"], ["status"], ["results", "x"]):
        refused = _as_user(unprivileged, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert refused.stderr.startswith("error: cannot read job-info.jsonl: Permission denied")
        assert "permissions" in refused.stderr
        assert "Invalid value" not in refused.stderr and "Traceback" not in refused.stderr

    # --local keeps the emulator's state beside the ledger: a directory the user cannot
    # write is a refusal that says so, not a traceback.
    directory.chmod(0o555)
    try:
        local = _as_user(unprivileged, "--job-info", "other.jsonl", "--local", "poll", "--once")
    finally:
        directory.chmod(0o755)
    assert local.returncode == 2, local.stderr
    assert local.stderr.startswith("error: --local: cannot write ")
    assert ".gembatch-emulator" in local.stderr and "Traceback" not in local.stderr


def test_info_on_a_non_utf8_ledger_reports_each_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes('{"input_file": "café.jsonl"}\n'.encode("latin-1") + b"\xff\xfe\x00\x01\n")
    before = path.read_bytes()
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:1: not UTF-8 (byte 0xe9")
    assert lines[1].startswith(f"{path}:2: not UTF-8 (byte 0xff")
    assert all("fix or delete it by hand" in line for line in lines)
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_info_prints_good_records_and_reports_a_corrupted_line_by_number(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(
        json.dumps(current(1)).encode() + b"\n{truncated\n" + json.dumps(current(2)).encode()
    )
    (tmp_path / "in").mkdir()
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 1
    assert stdout_records(result) == [current(1), current(2)]
    assert result.stderr.splitlines() == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes "
        "at column 2); the line is kept as it is: fix or delete it by hand"
    ]


# -- passthrough -------------------------------------------------------------------------


def test_info_passthrough_prints_records_as_they_are_and_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    records = [
        current(1),
        current(2, **{"x-own-field": {"kept": True}}),
        {"id": "j3", **current(3)},
    ]
    data = write_jsonl(path, records)
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stdout_records(result) == records  # no derived ids added
    assert result.stderr == ""
    assert path.read_bytes() == data


def test_info_adds_a_missing_count_from_the_input_file(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "project"
    path = ledger_dir / "job-info.jsonl"
    no_count = current(1)
    del no_count["count"]
    zero_count = {**current(2), "count": 0}
    data = write_jsonl(path, [no_count, zero_count])
    write_jsonl(ledger_dir / "in" / "1.jsonl", [REQUEST] * 3)
    write_jsonl(ledger_dir / "in" / "2.jsonl", [REQUEST] * 5)
    # Run from elsewhere: relative input paths are found next to the ledger too.
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = stdout_records(result)
    assert first == {**no_count, "count": 3} and list(first)[:2] == ["input_file", "count"]
    assert second == {**zero_count, "count": 5}
    assert path.read_bytes() == data  # read-only


def test_info_reports_a_missing_input_file_and_keeps_the_record(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    no_count = current(1)
    del no_count["count"]
    write_jsonl(path, [no_count])
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 1
    assert stdout_records(result) == [no_count]
    assert result.stderr.startswith(f"{path}:1: cannot count the requests of input file in/1")


# -- legacy records without the API ------------------------------------------------------


def test_info_without_api_key_names_the_legacy_line_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    old = legacy("in/1.jsonl", "batches/old")
    write_jsonl(path, [current(1), old])
    write_jsonl(tmp_path / "in" / "1.jsonl", [REQUEST])
    result = run_info(path, cwd=tmp_path)
    assert result.returncode == 1
    assert stdout_records(result) == [current(1), old]  # the rest is still printed
    [message] = result.stderr.splitlines()
    assert message.startswith(f"{path}:2: legacy v0.1.0 record (batch batches/old)")
    assert "set GEMINI_API_KEY" in message and "--local" in message


def test_info_local_converts_legacy_records_from_the_record_alone(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    data = write_jsonl(path, [legacy("in/1.jsonl", "batches/old")])
    write_jsonl(tmp_path / "in" / "1.jsonl", [REQUEST] * 4)
    result = run_info(path, cwd=tmp_path, local=True)
    assert result.returncode == 0, result.stderr
    [record] = stdout_records(result)
    assert record == {
        "input_file": "in/1.jsonl",
        "count": 4,
        "uploaded_file_name": "files/up-legacy",
        "batch": {
            "name": "batches/old",
            "display_name": "batch-job-legacy",
            "state": "JOB_STATE_SUCCEEDED",
            "create_time": "2025-07-13T01:01:38.807581",
            "end_time": "2025-07-13T01:03:03.448724",
        },
        "created_at": "2025-07-13T01:01:38.807581",
        "completed_at": "2025-07-13T01:03:03.448724",
        "final_state": "JOB_STATE_SUCCEEDED",
        "duration_seconds": 84,
        "converted_from": "v0.1.0-offline",
    }
    assert path.read_bytes() == data


# -- against the emulator ----------------------------------------------------------------


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    state = tmp_path_factory.mktemp("emulator")
    config = {"clock": {"pending_seconds": 0.1, "running_seconds": 0.3}}
    with EmulatorProcess(state_dir=state, config=config) as emulator:
        yield emulator


def create_finished_batch(emu: EmulatorProcess, directory: Path, name: str) -> tuple[Any, str]:
    """A real batch on the emulator, waited on until it succeeded; returns (batch, file)."""
    client = emu.sdk_client()
    source = directory / f"{name}.jsonl"
    write_jsonl(source, [REQUEST, {**REQUEST, "key": "k2"}])
    uploaded = client.files.upload(file=str(source), config={"mime_type": "jsonl"})
    batch = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": name}
    )
    deadline = time.monotonic() + 30
    while batch.state is None or batch.state.name != "JOB_STATE_SUCCEEDED":
        assert time.monotonic() < deadline, f"batch {batch.name} did not finish"
        time.sleep(0.1)
        batch = client.batches.get(name=batch.name)
    return batch, uploaded.name


def test_info_converts_legacy_records_through_the_api(emu: EmulatorProcess, tmp_path: Path) -> None:
    kept, kept_upload = create_finished_batch(emu, tmp_path, "kept")
    gone, gone_upload = create_finished_batch(emu, tmp_path, "gone")
    client = emu.sdk_client()  # kept in a variable: the SDK closes a collected client
    client.batches.delete(name=gone.name)  # as the original tool did when done
    no_count = current(9)
    del no_count["count"]
    write_jsonl(tmp_path / "in" / "9.jsonl", [REQUEST] * 7)
    records = [
        legacy("kept.jsonl", kept.name, kept_upload),
        legacy("gone.jsonl", gone.name, gone_upload),
        current(1),
        no_count,
    ]
    path = tmp_path / "job-info.jsonl"
    data = write_jsonl(path, records)
    gets_before = emu.stats()["calls"].get("batches.get", 0)

    result = run_info(path, cwd=tmp_path, env=emu.client_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    converted, offline, passthrough, counted = stdout_records(result)

    assert converted["batch"] == {
        "name": kept.name,
        "display_name": "kept",
        "model": "models/gemini-2.5-flash",
        "state": "JOB_STATE_SUCCEEDED",
        "create_time": kept.create_time.isoformat(),
        "update_time": kept.update_time.isoformat(),
        "end_time": kept.end_time.isoformat(),
        "dest": {"file_name": kept.dest.file_name},
    }
    assert converted["count"] == 2  # from kept.jsonl
    assert converted["uploaded_file_name"] == kept_upload
    assert converted["duration_seconds"] == 84 and converted["created_at"]
    assert "job_name" not in converted and "converted_from" not in converted

    assert offline["batch"]["name"] == gone.name
    assert offline["batch"]["state"] == "JOB_STATE_SUCCEEDED"
    assert offline["converted_from"] == "v0.1.0-offline"
    assert offline["uploaded_file_name"] == gone_upload

    assert passthrough == current(1)
    assert counted == {**no_count, "count": 7}
    assert path.read_bytes() == data  # info never writes
    assert emu.stats()["calls"]["batches.get"] - gets_before == 2  # only legacy records


def test_info_reports_an_api_failure_and_converts_the_other_records(
    emu: EmulatorProcess, tmp_path: Path
) -> None:
    first, _ = create_finished_batch(emu, tmp_path, "first")
    second, _ = create_finished_batch(emu, tmp_path, "second")
    path = tmp_path / "job-info.jsonl"
    write_jsonl(path, [legacy("first.jsonl", first.name), legacy("second.jsonl", second.name)])
    emu.set_config({"faults": {"rules": [{"endpoint": "batches.get", "status": 503, "first": 1}]}})
    try:
        result = run_info(path, cwd=tmp_path, env=emu.client_env())
    finally:
        emu.set_config({"faults": {"rules": []}})
    assert result.returncode == 1
    unconverted, converted = stdout_records(result)
    assert unconverted == legacy("first.jsonl", first.name)
    assert converted["batch"]["name"] == second.name and "converted_from" not in converted
    [message] = result.stderr.splitlines()
    assert message.startswith(f"{path}:1: cannot convert legacy v0.1.0 record")
    assert "503" in message and "try again later" in message


def test_manager_converts_a_legacy_ledger_once_and_keeps_other_lines(
    emu: EmulatorProcess, tmp_path: Path
) -> None:
    batch, upload = create_finished_batch(emu, tmp_path, "legacy")
    path = tmp_path / "job-info.jsonl"
    old = legacy(str(tmp_path / "legacy.jsonl"), batch.name, upload)
    write_jsonl(path, [old, current(1)])
    second_line = path.read_bytes().split(b"\n")[1]

    with AtomicJobManager(path, client=emu.sdk_client()) as manager:
        assert manager.was_converted()
    assert manager.writes == 1
    first_line, kept_line, _ = path.read_bytes().split(b"\n")
    assert kept_line == second_line
    stored = json.loads(first_line)
    assert stored["batch"]["name"] == batch.name and stored["id"].startswith("legacy-")

    with AtomicJobManager(path, client=emu.sdk_client()) as manager:
        assert not manager.was_converted()  # already in the current format
    assert manager.writes == 0


def test_a_v03_ledger_is_carried_on_with_derived_ids_and_minimal_rewrites(
    emu: EmulatorProcess, tmp_path: Path
) -> None:
    # v0.3.x wrote the current format without ids, compact or not, in its own key order.
    lines = [
        json.dumps(current(1), separators=(",", ":")).encode(),
        json.dumps(current(2), ensure_ascii=True, indent=None).encode(),
        json.dumps({"note": "ノート", **current(3)}, ensure_ascii=False).encode(),
    ]
    path = tmp_path / "job-info.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    ledger = JsonlLedger(path)
    snapshot = ledger.load()
    assert len({r["id"] for r in snapshot.records}) == 3
    assert snapshot.derived_ids == {r["id"] for r in snapshot.records}
    with AtomicJobManager(path, client=emu.sdk_client()):
        pass  # nothing needs converting: nothing is written
    assert path.read_bytes() == b"\n".join(lines) + b"\n"

    record = ledger.find_by_batch("batches/b2")
    record["batch"]["state"] = "JOB_STATE_SUCCEEDED"
    record["final_state"] = "JOB_STATE_SUCCEEDED"
    assert ledger.update_many([record]) == 1
    new_lines = path.read_bytes().split(b"\n")
    assert new_lines[0] == lines[0] and new_lines[2] == lines[2]
    assert json.loads(new_lines[1])["id"] == record["id"]  # persisted with the change
    assert JsonlLedger(path).find_by_id(record["id"])["final_state"] == "JOB_STATE_SUCCEEDED"

    result = run_info(path, cwd=tmp_path, env=emu.client_env())
    assert result.returncode == 0, result.stderr
    printed = stdout_records(result)
    assert printed[0] == current(1) and "id" in printed[1]  # only the stored id is shown


def test_info_with_a_rejected_api_key_says_to_check_the_key(
    emu: EmulatorProcess, tmp_path: Path
) -> None:
    path = tmp_path / "job-info.jsonl"
    write_jsonl(path, [legacy("in/1.jsonl", "batches/whatever")])
    env = {**emu.client_env(), "GEMINI_API_KEY": "not-the-right-key"}
    emu.set_config({"auth": {"api_keys": [emu.api_key]}})
    try:
        result = run_info(path, cwd=tmp_path, env=env)
    finally:
        emu.set_config({"auth": {"api_keys": []}})
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if "cannot convert" in line]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:1: ")
    assert "check GEMINI_API_KEY" in problems[0]
    assert "Traceback" not in result.stderr
