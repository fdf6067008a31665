"""Nothing lost, nothing paid twice: bad input, refused creates, kills, faults, retries."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from gembatch.ledger.jsonl import JsonlLedger
from tests.cli.helpers import gembatch, keys_of, ledger, request_file, results_of, spawn
from tests.conftest import wait_for

FAST = {"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}}
GOOD = '{"key": "ok", "request": {"contents": [{"parts": [{"text": "hi"}]}]}}\n'


def _write(path: Path, content: bytes | str) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)


BAD_INPUTS = [
    ("missing.jsonl", None, "missing.jsonl", "no such file"),
    ("adir", "DIR", "adir", "is a directory"),
    ("empty.jsonl", "", "empty.jsonl", "empty"),
    ("latin1.jsonl", "é".encode("latin-1"), "latin1.jsonl:1", "UTF-8"),
    ("json.jsonl", GOOD + '{"key": "x", "request": {oops}}\n', "json.jsonl:2", "JSON"),
    ("nokey.jsonl", '{"request": {"contents": [{"parts": [{"text": "a"}]}]}}\n',
     "nokey.jsonl:1", "key"),
    ("noreq.jsonl", '{"key": "a"}\n', "noreq.jsonl:1", "request"),
    ("dup.jsonl", GOOD + GOOD, "dup.jsonl:2", "duplicate key"),
    ("array.jsonl", "[1, 2]\n", "array.jsonl:1", "object"),
    ("misplaced.jsonl",
     '{"key": "a", "request": {"contents": [{"parts": [{"text": "a"}]}], "temperature": 0.2}}\n',
     "misplaced.jsonl:1", "generation_config"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, where, what", BAD_INPUTS)
def test_bad_input_is_refused_with_file_and_line_and_nothing_is_uploaded(
    emulator: Any, tmp_path: Path, name: str, content: Any, where: str, what: str
) -> None:
    if content == "DIR":
        (tmp_path / name).mkdir()
    elif content is not None:
        _write(tmp_path / name, content)
    request_file(tmp_path / "good.jsonl", 2)  # a good file in the same command

    done = gembatch(emulator, tmp_path, "submit", "good.jsonl", name)

    assert done.returncode == 2
    assert where in done.stderr and what.lower() in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr
    stats = emulator.stats()
    assert stats["upload_starts"] == 0 and stats["batches_created"] == 0
    assert ledger(tmp_path) == []  # nothing half-done either


def test_missing_api_key_stops_before_any_work(emulator: Any, tmp_path: Path) -> None:
    request_file(tmp_path / "a.jsonl", 2)
    done = gembatch(None, tmp_path, "submit", "a.jsonl",
                    env={"GOOGLE_GEMINI_BASE_URL": emulator.base_url})  # fmt: skip
    assert done.returncode == 2
    assert "GEMINI_API_KEY is not set" in done.stderr
    assert emulator.stats()["upload_starts"] == 0


def test_a_bad_api_key_is_reported_not_retried(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({**FAST, "auth": {"api_keys": ["the-right-key"]}})
    request_file(tmp_path / "a.jsonl", 2)
    done = gembatch(emulator, tmp_path, "submit", "a.jsonl")
    assert done.returncode == 1
    assert "API key not valid" in done.stdout
    assert emulator.stats()["upload_starts"] == 0  # refused before a byte was sent
    (record,) = ledger(tmp_path)
    assert record["status"] == "failed" and record["error"]["class"] == "AUTH"


def test_unknown_model_stops_before_anything_is_uploaded_or_recorded(
    emulator: Any, tmp_path: Path
) -> None:
    request_file(tmp_path / "a.jsonl", 2)
    request_file(tmp_path / "b.jsonl", 2, prefix="b")

    done = gembatch(emulator, tmp_path, "submit", "-m", "no-such-model", "a.jsonl", "b.jsonl")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown model 'no-such-model'" in done.stderr and "404" in done.stderr
    assert "-m/--model" in done.stderr and "$GEMBATCH_MODEL" in done.stderr
    assert "Traceback" not in done.stderr
    stats = emulator.stats()
    assert stats["upload_starts"] == 0 and stats["batches_created"] == 0
    assert stats["calls"]["models.get"] == 1  # one check for the one model of both files
    assert ledger(tmp_path) == []
    # the same for `run` with the model from the environment, and for a dry run
    ran = gembatch(emulator, tmp_path, "run", "a.jsonl", env={"GEMBATCH_MODEL": "no-such-model"})
    assert ran.returncode == 2 and "no-such-model" in ran.stderr
    dry = gembatch(emulator, tmp_path, "submit", "--dry-run", "-m", "no-such-model", "a.jsonl")
    assert dry.returncode == 2 and "unknown model 'no-such-model'" in dry.stderr
    stats = emulator.stats()
    assert stats["upload_starts"] == 0 and stats["batches_created"] == 0
    assert ledger(tmp_path) == []


def test_a_model_without_batch_mode_is_refused_by_the_create_and_the_upload_deleted(
    emulator: Any, tmp_path: Path
) -> None:
    # models.get knows it (a warning), the create answers 404: the job fails, nothing stays
    request_file(tmp_path / "a.jsonl", 2)
    done = gembatch(emulator, tmp_path, "submit", "-m", "gemini-embedding-001", "a.jsonl")
    assert done.returncode == 1
    assert "does not list batchGenerateContent" in done.stderr
    assert "404" in done.stdout and "gemini-embedding-001" in done.stdout
    stats = emulator.stats()
    assert stats["uploads"] == 1 and stats["files_deleted"] == 1 and stats["files"] == 0
    (record,) = ledger(tmp_path)
    assert record["status"] == "failed" and record["error"]["class"] == "NOT_FOUND"


def test_a_model_check_that_cannot_get_through_does_not_block_the_submit(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({**FAST, "faults": {"rules": [{"endpoint": "models.get",
                                                               "status": 503}]}})  # fmt: skip
    request_file(tmp_path / "a.jsonl", 2)
    done = gembatch(emulator, tmp_path, "submit", "a.jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "could not check model 'gemini-2.5-flash-lite'" in done.stderr
    stats = emulator.stats()
    assert stats["calls"]["models.get"] == 2  # retried once, then the create decided
    assert stats["batches_created"] == 1


def test_create_refused_with_400_deletes_the_upload_and_fails_until_retried(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {**FAST, "faults": {"rules": [{"endpoint": "batches.create", "status": 400, "first": 1}]}}
    )
    request_file(tmp_path / "a.jsonl", 3)
    done = gembatch(emulator, tmp_path, "submit", "a.jsonl")
    assert done.returncode == 1 and "400" in done.stdout
    stats = emulator.stats()
    assert stats["files_deleted"] == 1 and stats["files"] == 0 and stats["batches_created"] == 0
    (record,) = ledger(tmp_path)
    assert record["status"] == "failed"
    assert record["error"]["class"] == "INVALID_INPUT" and record["error"]["step"] == "submitting"
    # 400 is not retried by itself; `retry` asks for it explicitly
    retried = gembatch(emulator, tmp_path, "retry", "a.jsonl")
    assert retried.returncode == 0, retried.stderr + retried.stdout
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stderr
    assert sorted(results_of(tmp_path / "a.jsonl")) == sorted(keys_of(tmp_path / "a.jsonl"))


def test_create_refused_with_429_is_retried_by_the_next_run(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {
            **FAST,
            "faults": {
                "rules": [
                    {"endpoint": "batches.create", "status": 429, "first": 2,
                     "retry_after_seconds": 1}
                ]
            },
        }
    )  # fmt: skip
    request_file(tmp_path / "a.jsonl", 3)
    done = gembatch(emulator, tmp_path, "submit", "--retry-interval", "0.2", "a.jsonl")
    assert done.returncode == 1
    assert "429" in done.stdout and "will retry at" in done.stdout
    (record,) = ledger(tmp_path)
    assert record["tasks"][0]["state"] == "new" and record["error"]["class"] == "RATE_LIMITED"
    assert emulator.stats()["files_deleted"] == 1
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stderr + polled.stdout
    stats = emulator.stats()
    assert stats["faults"]["batches.create"] == 2  # the second refusal came in `poll`
    assert stats["batches_created"] == 1
    (record,) = ledger(tmp_path)
    assert record["status"] == "completed" and record["tasks"][0]["attempt"] == 3


@pytest.mark.parametrize("batch_done_first", [False, True])
def test_sigkill_between_remote_create_and_ledger_write_creates_exactly_one_batch(
    emulator_factory: Any, tmp_path: Path, batch_done_first: bool
) -> None:
    """The create reaches Gemini, the answer never reaches the ledger: poll must find the
    batch by its display name instead of creating another (which would be paid twice).
    Also when the batch has already finished by the time poll finds it."""
    emulator = emulator_factory(
        {**FAST, "faults": {"rules": [{"endpoint": "batches.create", "latency_after_ms": 60000}]}}
    )
    request_file(tmp_path / "a.jsonl", 4)
    proc = spawn(emulator, tmp_path, "submit", "a.jsonl")
    wait_for(lambda: emulator.stats()["batches_created"] == 1, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (record,) = ledger(tmp_path)
    task = record["tasks"][0]
    assert task["state"] == "creating" and "batch_name" not in task  # only the intent
    if batch_done_first:
        time.sleep(2.0)  # pending 0.3 s + running 1.0 s: SUCCEEDED before poll looks

    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2", timeout=60)

    assert polled.returncode == 0, polled.stderr + polled.stdout
    stats = emulator.stats()
    assert stats["batches_created"] == 1
    assert list(stats["creates_by_display_name"].values()) == [1]
    assert sorted(results_of(tmp_path / "a.jsonl")) == sorted(keys_of(tmp_path / "a.jsonl"))
    released = ledger(tmp_path)[0]["tasks"][0]
    assert released["batch_name"].startswith("batches/")


def test_sigkill_during_upload_leaves_no_orphan_and_no_duplicate(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {**FAST, "faults": {"rules": [{"endpoint": "files.upload_chunk", "first": 1,
                                       "latency_after_ms": 60000}]}}
    )  # fmt: skip
    request_file(tmp_path / "a.jsonl", 4)
    proc = spawn(emulator, tmp_path, "submit", "a.jsonl")
    wait_for(lambda: emulator.stats()["uploads"] == 1, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ledger(tmp_path)[0]["tasks"][0]["state"] == "uploading"

    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")

    assert polled.returncode == 0, polled.stderr + polled.stdout
    stats = emulator.stats()
    assert stats["uploads"] == 2  # uploaded again; the orphan was found and deleted
    assert stats["batches_created"] == 1
    assert stats["files"] == 0
    assert sorted(results_of(tmp_path / "a.jsonl")) == sorted(keys_of(tmp_path / "a.jsonl"))


def test_a_running_batch_is_never_downloaded_or_cleaned_up(
    emulator_factory: Any, tmp_path: Path
) -> None:
    # Running long enough for three polls, each a process of its own (seconds apiece on
    # a loaded machine); the last poll below waits for the end.
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 25.0}})
    request_file(tmp_path / "a.jsonl", 10)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    time.sleep(0.5)
    seen_running = 0
    for _ in range(3):
        once = gembatch(emulator, tmp_path, "poll", "--once")
        assert once.returncode == 0, once.stderr
        stats = emulator.stats()
        (record,) = ledger(tmp_path)
        if record["tasks"][0].get("remote_state") == "JOB_STATE_RUNNING":
            seen_running += 1
            assert record["status"] == "running" and record["step"] == "processing"
            assert stats["downloads"] == 0
            assert stats["files_deleted"] == 0 and stats["batches_deleted"] == 0
            assert not (tmp_path / "results" / "a.jsonl").exists()
    assert seen_running >= 2
    assert gembatch(emulator, tmp_path, "poll", "--interval", "0.5").returncode == 0
    assert emulator.stats()["downloads"] == 1


@pytest.mark.parametrize(
    "config, final_state, status",
    [
        ({"faults": {"batches": {"fail_rate": 1.0}}}, "JOB_STATE_FAILED", "failed"),
        ({"clock": {"pending_seconds": 0.2, "running_seconds": 60, "expire_after_seconds": 1.5}},
         "JOB_STATE_EXPIRED", "failed"),
    ],
)  # fmt: skip
def test_failed_and_expired_batches_end_the_job_with_final_state(
    emulator_factory: Any, tmp_path: Path, config: dict, final_state: str, status: str
) -> None:
    emulator = emulator_factory({**FAST, **config})
    request_file(tmp_path / "a.jsonl", 3)
    done = gembatch(emulator, tmp_path, "run", "--interval", "0.3", "a.jsonl")
    assert done.returncode == 1  # a failed job
    (record,) = ledger(tmp_path)
    assert record["status"] == status
    assert record["final_state"] == final_state
    assert record["completed_at"] and isinstance(record["duration_seconds"], int)
    assert not (tmp_path / "results" / "a.jsonl").exists()
    stats = emulator.stats()
    assert stats["downloads"] == 0
    assert stats["batches_deleted"] == 1 and stats["files"] == 0  # nothing to keep: cleaned


def test_expired_batch_is_resubmitted_when_asked(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory(
        {"clock": {"pending_seconds": 0.2, "running_seconds": 60, "expire_after_seconds": 1.0}}
    )
    request_file(tmp_path / "a.jsonl", 3)
    done = gembatch(
        emulator, tmp_path, "run", "--interval", "0.3", "--retry-on", "EXPIRED",
        "--max-attempts", "2", "--retry-interval", "0.1", "a.jsonl",
    )  # fmt: skip
    assert done.returncode == 1
    (record,) = ledger(tmp_path)
    assert [t["attempt"] for t in record["tasks"]] == [1, 2]
    assert record["final_state"] == "JOB_STATE_EXPIRED"
    assert emulator.stats()["batches_created"] == 2


def test_cancel_ends_a_running_job_as_cancelled(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 60}})
    request_file(tmp_path / "a.jsonl", 3)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    cancelled = gembatch(emulator, tmp_path, "cancel", "a.jsonl")
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout
    assert emulator.stats()["batches_cancelled"] == 1
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stderr
    (record,) = ledger(tmp_path)
    assert record["status"] == "cancelled"
    assert record["final_state"] == "JOB_STATE_CANCELLED" and record["completed_at"]
    again = gembatch(emulator, tmp_path, "cancel", "a.jsonl")
    assert again.returncode == 2 and "only pending or running jobs" in again.stderr


def test_a_cancel_gemini_does_not_take_leaves_the_job_cancelling_and_poll_sends_it_again(
    emulator_factory: Any, tmp_path: Path
) -> None:
    rules = [{"endpoint": "batches.cancel", "status": 503}]
    emulator = emulator_factory(
        {"clock": {"pending_seconds": 0.2, "running_seconds": 60}, "faults": {"rules": rules}}
    )
    request_file(tmp_path / "a.jsonl", 3)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    cancelled = gembatch(emulator, tmp_path, "cancel", "a.jsonl")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "Traceback" not in cancelled.stderr
    assert "warning: a.jsonl: cancel:" in cancelled.stderr, cancelled.stderr
    assert "`gembatch poll` sends the cancel again" in cancelled.stderr
    assert "cancelling" in cancelled.stdout
    assert emulator.stats()["batches_cancelled"] == 0
    (record,) = ledger(tmp_path)
    assert record["status"] == "cancelling"

    emulator.set_config({"faults": {"rules": []}})
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stderr
    assert emulator.stats()["batches_cancelled"] == 1
    (record,) = ledger(tmp_path)
    assert record["status"] == "cancelled" and record["final_state"] == "JOB_STATE_CANCELLED"


def test_faults_everywhere_still_end_every_job_with_bounded_retries(
    emulator_factory: Any, tmp_path: Path
) -> None:
    rules = [
        {"endpoint": "batches.create", "status": 429, "rate": 0.4, "retry_after_seconds": 0.2},
        {"endpoint": "batches.get", "status": 503, "rate": 0.3},
        {"endpoint": "files.upload", "status": 500, "rate": 0.3},
        {"endpoint": "files.delete", "status": 503, "rate": 0.3},
        {"endpoint": "*", "latency_ms": 20},
    ]
    emulator = emulator_factory(
        {
            "seed": 3,
            **FAST,
            "faults": {"rules": rules, "downloads": {"truncate_first": 2, "mode": "abort"}},
        }
    )
    files = [request_file(tmp_path / f"f{i}.jsonl", 5, prefix=f"f{i}-").name for i in range(6)]
    done = gembatch(
        emulator, tmp_path, "run", "--interval", "0.2", "--retry-interval", "0.1",
        "--max-attempts", "10", *files,
    )  # fmt: skip
    assert gembatch(emulator, tmp_path, "poll", "--interval", "0.2").returncode == 0
    records = ledger(tmp_path)
    assert [r["status"] for r in records] == ["completed"] * 6, done.stdout + done.stderr
    for name in files:
        assert sorted(results_of(tmp_path / name)) == sorted(keys_of(tmp_path / name))
    stats = emulator.stats()
    assert stats["batches_created"] == 6
    assert set(stats["creates_by_display_name"].values()) == {1}
    assert stats["downloads_truncated"] == 2
    assert sum(stats["faults"].values()) > 5
    for record in records:
        assert record["tasks"][0]["attempt"] <= 10


def test_a_download_cut_every_time_leaves_no_results_file_and_no_cleanup(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {**FAST, "faults": {"downloads": {"truncate_rate": 1.0, "mode": "silent"}}}
    )
    request_file(tmp_path / "a.jsonl", 20)
    done = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl")
    assert done.returncode == 1
    (record,) = ledger(tmp_path)
    assert record["status"] == "failed" and record["error"]["class"] == "DOWNLOAD"
    assert "missing" in record["error"]["message"]
    assert not (tmp_path / "results" / "a.jsonl").exists()
    assert not [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    stats = emulator.stats()
    assert stats["downloads"] == 3  # bounded (max_download_attempts in the test settings)
    assert stats["batches_deleted"] == 0 and stats["files_deleted"] == 0  # results kept remote


def test_requests_that_failed_inside_a_batch_are_resubmitted_by_retry(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    path = tmp_path / "a.jsonl"
    request_file(path, 7)
    with open(path, "a") as handle:
        for i in range(3):
            text = f"flaky {i} [[emulator:fail-first=1]]"
            handle.write(json.dumps({"key": f"flaky{i}", "request": {
                "contents": [{"parts": [{"text": text}]}]}}) + "\n")  # fmt: skip
    assert gembatch(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl").returncode == 0
    first = results_of(path)
    assert sum("error" in line for line in first.values()) == 3

    retried = gembatch(emulator, tmp_path, "retry", "a.jsonl")
    assert retried.returncode == 0, retried.stderr + retried.stdout
    assert "retrying 3 request(s)" in retried.stdout
    assert gembatch(emulator, tmp_path, "poll", "--interval", "0.2").returncode == 0

    final = results_of(path)
    assert sorted(final) == sorted(keys_of(path))  # one line per key
    assert all("response" in line for line in final.values())
    (record,) = ledger(tmp_path)
    assert record["requests"] == {"total": 10, "succeeded": 10, "failed": 0, "pending": 0}
    assert gembatch(emulator, tmp_path, "results", "a.jsonl").returncode == 0


def test_failed_requests_are_retried_automatically_when_configured(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    path = tmp_path / "a.jsonl"
    request_file(path, 3)
    with open(path, "a") as handle:
        flaky = {"parts": [{"text": "x [[emulator:fail-first=1]]"}]}
        handle.write(json.dumps({"key": "flaky", "request": {"contents": [flaky]}}) + "\n")
    done = gembatch(
        emulator, tmp_path, "run", "--interval", "0.2", "--retry-failed-requests", "a.jsonl"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert all("response" in line for line in results_of(path).values())
    assert emulator.stats()["batches_created"] == 2


def test_submit_while_poll_runs_loses_nothing(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 2.0}})
    first = [request_file(tmp_path / f"a{i}.jsonl", 3, prefix=f"a{i}-").name for i in range(5)]
    assert gembatch(emulator, tmp_path, "submit", *first).returncode == 0
    poller = spawn(emulator, tmp_path, "poll", "--interval", "0.2")
    second = [request_file(tmp_path / f"b{i}.jsonl", 3, prefix=f"b{i}-").name for i in range(5)]
    for name in second:  # one submit per file, racing the poller's ledger writes
        assert gembatch(emulator, tmp_path, "submit", name).returncode == 0
    _out, err = poller.communicate(timeout=180)
    assert poller.returncode == 0, err
    # the poll may finish before the last submits' jobs; one more poll collects them
    assert gembatch(emulator, tmp_path, "poll", "--interval", "0.2").returncode == 0
    records = ledger(tmp_path)
    assert len(records) == 10
    assert {r["status"] for r in records} == {"completed"}
    assert set(emulator.stats()["creates_by_display_name"].values()) == {1}


def test_a_second_poll_on_the_same_ledger_is_refused(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 30}})
    request_file(tmp_path / "a.jsonl", 2)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    poller = spawn(emulator, tmp_path, "poll", "--interval", "0.5")
    try:
        wait_for(lambda: emulator.stats()["calls"].get("batches.get", 0) >= 1)
        second = gembatch(emulator, tmp_path, "poll", "--once")
        assert second.returncode == 2
        assert "is already polling" in second.stderr and str(poller.pid) in second.stderr
    finally:
        poller.kill()
        poller.wait()


def test_a_locked_ledger_names_its_holder(emulator: Any, tmp_path: Path) -> None:
    request_file(tmp_path / "a.jsonl", 2)
    held = JsonlLedger(tmp_path / "job-info.jsonl")
    with held.locked():
        done = gembatch(
            emulator, tmp_path, "submit", "a.jsonl", env={"GEMBATCH_LOCK_TIMEOUT": "0.5"}
        )
    assert done.returncode == 2
    assert "job-info.jsonl is locked" in done.stderr and str(os.getpid()) in done.stderr
    assert emulator.stats()["upload_starts"] == 0


def test_a_corrupt_ledger_line_is_reported_and_the_other_jobs_go_on(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    request_file(tmp_path / "a.jsonl", 2)
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    with open(tmp_path / "job-info.jsonl", "a") as handle:
        handle.write('{"this is": not json\n')
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert "job-info.jsonl:2: not valid JSON" in polled.stderr, polled.stderr
    status = gembatch(emulator, tmp_path, "status")
    assert status.returncode == 1 and "job-info.jsonl:2" in status.stderr
    text = (tmp_path / "job-info.jsonl").read_text().splitlines()
    assert text[1] == '{"this is": not json'  # kept byte for byte
    assert json.loads(text[0])["status"] == "completed"


def test_priority_decides_the_order_with_one_live_batch(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.1, "running_seconds": 0.3}})
    for name, priority in (("low", "0"), ("high", "5"), ("mid", "1")):
        request_file(tmp_path / f"{name}.jsonl", 2, prefix=name)
        done = gembatch(
            emulator, tmp_path, "submit", "--max-live-batches", "0", "--priority", priority,
            f"{name}.jsonl",
        )  # fmt: skip
        assert done.returncode == 0 and "queued" in done.stdout
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.1", "--max-live-batches", "1")
    assert polled.returncode == 0, polled.stderr
    created = {r["input_file"]: r["tasks"][0]["batch"]["create_time"] for r in ledger(tmp_path)}
    assert sorted(created, key=created.__getitem__) == ["high.jsonl", "mid.jsonl", "low.jsonl"]
