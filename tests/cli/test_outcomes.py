"""What a command's exit code and output say about its jobs, and the remote side of
retry and cleanup: a 429 retried on the way does not fail `run`; a past error is not shown
as a finished job's error; `retry` after a failed download downloads the same batch again;
`cleanup` deletes what is left and never what a live batch uses."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import (
    ActiveSampler,
    Background,
    gembatch,
    keys_of,
    ledger,
    request_file,
    results_of,
)
from tests.conftest import wait_for

FAST = {"clock": {"pending_seconds": 0.3, "running_seconds": 1.0}}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _create_429(first: int) -> dict[str, Any]:
    rule = {"endpoint": "batches.create", "status": 429, "first": first, "retry_after_seconds": 0}
    return {**FAST, "faults": {"rules": [rule]}}


# -- exit codes and the errors shown -----------------------------------------------------------


def test_run_exits_0_when_a_429_on_create_was_retried_and_the_job_completed(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(_create_429(1))
    request_file(tmp_path / "a.jsonl", 3)

    done = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "--retry-interval", "0.2",
                    "a.jsonl")  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 job: 1 completed" in done.stdout
    assert emulator.stats()["faults"]["batches.create"] == 1
    (record,) = ledger(tmp_path)
    assert record["status"] == "completed" and record.get("error") is None
    assert [e["code"] for e in record["errors"]] == ["429 RESOURCE_EXHAUSTED"]  # the history
    # the recovered 429 is not shown as the finished job's error
    finished = [line for line in done.stdout.splitlines() if ": completed" in line]
    assert finished and not [line for line in finished if "error:" in line]
    table = gembatch(emulator, tmp_path, "status")
    assert table.returncode == 0 and "RESOURCE_EXHAUSTED" not in table.stdout
    assert "Error" not in table.stdout  # no job has an error: no Error column
    (job,) = json.loads(gembatch(emulator, tmp_path, "status", "--json").stdout)
    assert job["error"] is None and job["error_count"] == 1


def test_run_exits_1_when_it_skips_a_duplicate_of_a_failed_job(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({**FAST, "auth": {"api_keys": ["emulator-test-key"]}})
    request_file(tmp_path / "a.jsonl", 2)
    bad = gembatch(emulator, tmp_path, "submit", "a.jsonl", env={"GEMINI_API_KEY": "wrong"})
    assert bad.returncode == 1 and "API key not valid" in bad.stdout
    assert emulator.stats()["upload_starts"] == 0

    again = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl")

    assert again.returncode == 1, again.stdout + again.stderr
    assert "skip: already submitted as job" in again.stdout and "1 failed" in again.stdout
    assert emulator.stats()["upload_starts"] == 0


# -- retry after a failed download ------------------------------------------------------------


def test_retry_after_a_download_cut_every_time_downloads_the_same_batch_again(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {**FAST, "faults": {"downloads": {"truncate_rate": 1.0, "mode": "silent"}}}
    )
    path = request_file(tmp_path / "a.jsonl", 20)
    done = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl")
    assert done.returncode == 1
    assert "error: a.jsonl: download failed" in done.stdout
    assert "a.jsonl: a.jsonl:" not in done.stdout  # the file is named once
    (record,) = ledger(tmp_path)
    assert record["status"] == "failed" and record["error"]["class"] == "DOWNLOAD"
    kept = gembatch(emulator, tmp_path, "cleanup", "-y")
    assert kept.returncode == 0 and "kept:" in kept.stdout and "gembatch retry" in kept.stdout
    assert emulator.stats()["files_deleted"] == 0 and emulator.stats()["batches_deleted"] == 0

    emulator.set_config({"faults": {"downloads": {"truncate_rate": 0.0}}})
    retried = gembatch(emulator, tmp_path, "retry", "a.jsonl")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "downloading the results of batches/" in retried.stdout
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")

    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert sorted(results_of(path)) == sorted(keys_of(path))
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["uploads"] == 1  # nothing paid twice
    assert stats["batches_deleted"] == 1 and stats["files"] == 0  # the remote copies cleaned
    (record,) = ledger(tmp_path)
    assert record["status"] == "completed"
    assert record["requests"] == {"total": 20, "succeeded": 20, "failed": 0, "pending": 0}
    assert [t["state"] for t in record["tasks"]] == ["failed", "done"]
    assert record["tasks"][0]["batch_name"] == record["tasks"][1]["batch_name"]
    nothing = gembatch(emulator, tmp_path, "cleanup", "-y")
    assert "nothing to clean up" in nothing.stdout


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                       check=True, capture_output=True, text=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot mount a tmpfs to fill a disk (needs root): {detail}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as handle:
        while True:
            handle.write(b"x" * 1024)
    return filler


def test_a_full_disk_says_where_and_what_to_do_and_retry_downloads_again(
    emulator_factory: Any, tmp_path: Path, tiny_disk: Path
) -> None:
    emulator = emulator_factory(FAST)
    path = request_file(tiny_disk / "a.jsonl", 20)
    (tiny_disk / "results" / ".gembatch").mkdir(parents=True)
    filler = _fill(tiny_disk)
    job_info = str(tmp_path / "job-info.jsonl")

    done = gembatch(emulator, tiny_disk, "--job-info", job_info, "run", "--interval", "0.2",
                    "a.jsonl")  # fmt: skip

    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    (record,) = ledger(tmp_path)
    error = record["error"]
    assert record["status"] == "failed" and error["class"] == "LOCAL_IO"
    assert error["code"] == "ENOSPC"
    assert str(tiny_disk / "results") in error["message"]
    assert "free some space" in error["message"] and "gembatch retry" in error["message"]
    assert "free some space" in done.stdout
    assert emulator.stats()["batches_deleted"] == 0  # the only copy is remote: kept

    filler.unlink()
    retried = gembatch(emulator, tiny_disk, "--job-info", job_info, "retry", "a.jsonl")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    polled = gembatch(emulator, tiny_disk, "--job-info", job_info, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert sorted(results_of(path)) == sorted(keys_of(path))
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["files"] == 0


# -- cleanup ----------------------------------------------------------------------------------


def test_cleanup_deletes_what_finished_jobs_left_remotely(
    emulator_factory: Any, tmp_path: Path
) -> None:
    deletes_fail = [
        {"endpoint": "files.delete", "status": 503},
        {"endpoint": "batches.delete", "status": 503},
    ]
    emulator = emulator_factory({**FAST, "faults": {"rules": deletes_fail}})
    request_file(tmp_path / "a.jsonl", 3)
    # The job completes (cleanup errors are not fatal); poll goes on retrying the deletes
    # until it is stopped.
    run = Background(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl")
    try:
        wait_for(lambda: [r["status"] for r in ledger(tmp_path)] == ["completed"], timeout=60)
        wait_for(lambda: emulator.stats()["faults"].get("batches.delete", 0) >= 2, timeout=60)
    finally:
        run.kill()
    assert emulator.stats()["files"] == 2  # the input and the output are still there
    emulator.set_config({"faults": {"rules": []}})

    refused = gembatch(emulator, tmp_path, "cleanup")  # stdin is not a terminal
    assert refused.returncode == 2 and "add -y" in refused.stderr
    assert "a.jsonl (task 0)" in refused.stdout
    assert emulator.stats()["files"] == 2

    cleaned = gembatch(emulator, tmp_path, "cleanup", "-y")

    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert "deleted 3 of 3 remote items" in cleaned.stdout
    stats = emulator.stats()
    assert stats["files"] == 0 and stats["batches_deleted"] == 1
    (record,) = ledger(tmp_path)
    assert record["tasks"][0]["cleaned"] == {"input_file": True, "batch": True,
                                             "output_file": True}  # fmt: skip
    again = gembatch(emulator, tmp_path, "cleanup", "-y")
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_cleanup_all_pages_through_everything_and_keeps_a_live_batch_and_its_input(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(
        {"clock": {"pending_seconds": 0.2, "running_seconds": 600}, "limits": {"page_size_max": 2}}
    )
    client = emulator.sdk_client()
    source = request_file(tmp_path / "other-tool.jsonl", 2)

    def upload(name: str) -> str:
        config = {"mime_type": "jsonl", "display_name": name}
        return client.files.upload(file=str(source), config=config).name

    live_input = upload("live")
    live = client.batches.create(model="gemini-2.5-flash-lite", src=live_input)
    ended = client.batches.create(model="gemini-2.5-flash-lite", src=upload("ended"))
    client.batches.cancel(name=ended.name)
    for i in range(5):
        upload(f"orphan-{i}")
    assert emulator.stats()["files"] == 7

    refused = gembatch(emulator, tmp_path, "cleanup", "--all")
    assert refused.returncode == 2 and "add -y" in refused.stderr
    assert emulator.stats()["files_deleted"] == 0

    done = gembatch(emulator, tmp_path, "cleanup", "--all", "-y")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 finished batch(es) and 6 file(s)" in done.stdout
    stats = emulator.stats()
    assert stats["files_deleted"] == 6 and stats["files"] == 1  # every page was read
    assert stats["batches_deleted"] == 1 and stats["batches_deleted_while_active"] == 0
    assert client.files.get(name=live_input).name == live_input  # the live batch's input
    assert client.batches.get(name=live.name).state.name in ("JOB_STATE_PENDING",
                                                             "JOB_STATE_RUNNING")  # fmt: skip


# -- the rest of the flow ---------------------------------------------------------------------


def test_a_split_job_never_has_more_than_max_parallel_tasks_live(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.2, "running_seconds": 0.5}})
    path = request_file(tmp_path / "big.jsonl", 50)
    with ActiveSampler(emulator) as sampler:
        done = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "--max-task-requests",
                        "5", "--max-parallel-tasks", "2", "big.jsonl")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert 1 <= sampler.peak <= 2
    assert emulator.stats()["batches_created"] == 10
    assert sorted(results_of(path)) == sorted(keys_of(path))


def test_demo_on_a_copy_of_the_examples(tmp_path: Path) -> None:
    examples = tmp_path / "examples"
    examples.mkdir()
    names = sorted(p.name for p in EXAMPLES.glob("*.jsonl"))
    for name in names:
        shutil.copy(EXAMPLES / name, examples / name)

    done = gembatch(None, tmp_path, "demo", "--dir", str(examples), timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(names)} jobs: {len(names)} completed" in done.stdout
    assert "What was produced:" in done.stdout
    for name in names:
        assert sorted(results_of(examples / name)) == sorted(keys_of(examples / name))
        assert f"results/{name}: " in done.stdout


def test_local_submit_then_local_poll_share_the_emulator_state(tmp_path: Path) -> None:
    path = request_file(tmp_path / "a.jsonl", 3)
    submitted = gembatch(None, tmp_path, "--local", "submit", "a.jsonl")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted batches/" in submitted.stdout
    polled = gembatch(None, tmp_path, "--local", "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert sorted(results_of(path)) == sorted(keys_of(path))
    (record,) = ledger(tmp_path)
    assert record["status"] == "completed"


def test_a_line_over_the_task_size_limit_is_refused_with_file_and_line(
    emulator: Any, tmp_path: Path
) -> None:
    request_file(tmp_path / "a.jsonl", 3)
    done = gembatch(emulator, tmp_path, "submit", "--max-task-bytes", "20", "a.jsonl")
    assert done.returncode == 2
    assert "a.jsonl:1" in done.stderr and "Traceback" not in done.stderr
    assert emulator.stats()["upload_starts"] == 0 and ledger(tmp_path) == []


def test_the_network_down_is_said_clearly_and_the_ledger_stays_intact(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{port}", "GEMINI_API_KEY": "k"}
    request_file(tmp_path / "a.jsonl", 2)

    done = gembatch(None, tmp_path, "submit", "--retry-interval", "0.1", "a.jsonl", env=env)

    assert done.returncode == 1
    assert "could not connect to the server" in done.stdout and "will retry at" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    (record,) = ledger(tmp_path)
    assert record["error"]["class"] == "NETWORK" and record["tasks"][0]["state"] == "new"
    once = gembatch(None, tmp_path, "poll", "--once", env=env)
    assert "could not connect to the server" in once.stdout
    assert "Traceback" not in once.stdout + once.stderr
    (record,) = ledger(tmp_path)
    assert record["status"] in ("pending", "running") and record["tasks"][0]["state"] == "new"
    assert gembatch(None, tmp_path, "status", env=env).returncode == 0


@pytest.mark.parametrize("max_attempts, status", [(3, "failed"), (6, "completed")])
def test_a_429_storm_on_create_is_retried_a_bounded_number_of_times(
    emulator_factory: Any, tmp_path: Path, max_attempts: int, status: str
) -> None:
    emulator = emulator_factory(_create_429(4))  # the first 4 creates are refused
    request_file(tmp_path / "a.jsonl", 2)

    done = gembatch(emulator, tmp_path, "run", "--interval", "0.2", "--retry-interval", "0.1",
                    "--max-attempts", str(max_attempts), "a.jsonl")  # fmt: skip

    (record,) = ledger(tmp_path)
    assert record["status"] == status, done.stdout + done.stderr
    stats = emulator.stats()
    assert stats["files"] == 0  # refused creates' uploads deleted; the rest cleaned up
    if status == "failed":
        assert done.returncode == 1
        assert stats["faults"]["batches.create"] == 3 and stats["batches_created"] == 0
        assert record["tasks"][0]["attempt"] == 3
        assert record["error"]["class"] == "RATE_LIMITED"
    else:
        assert done.returncode == 0
        assert stats["faults"]["batches.create"] == 4 and stats["batches_created"] == 1
        assert record["tasks"][0]["attempt"] == 5
        assert len(record["errors"]) == 4


def test_a_job_whose_batch_vanished_fails_alone_and_says_why(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.3, "running_seconds": 3.0}})
    names = [request_file(tmp_path / f"{n}.jsonl", 2, prefix=n).name for n in "abc"]
    assert gembatch(emulator, tmp_path, "submit", *names).returncode == 0
    gone = next(r for r in ledger(tmp_path) if r["input_file"] == "b.jsonl")
    client = emulator.sdk_client()  # kept: the SDK closes its transport when collected
    client.batches.delete(name=gone["tasks"][0]["batch_name"])

    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")

    assert polled.returncode == 1, polled.stdout + polled.stderr
    assert [line for line in polled.stdout.splitlines()
            if "error: b.jsonl:" in line and "404" in line], polled.stdout  # fmt: skip
    by_file = {r["input_file"]: r for r in ledger(tmp_path)}
    assert by_file["a.jsonl"]["status"] == by_file["c.jsonl"]["status"] == "completed"
    failed = by_file["b.jsonl"]
    assert failed["status"] == "failed" and failed["error"]["class"] == "NOT_FOUND"
    assert any(e["class"] == "NOT_FOUND" for e in failed["errors"])
    assert sorted(results_of(tmp_path / "a.jsonl")) == ["a0", "a1"]


def test_submit_force_gives_the_new_job_its_own_results_file(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    path = request_file(tmp_path / "a.jsonl", 3)
    assert gembatch(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl").returncode == 0
    first = (tmp_path / "results" / "a.jsonl").read_bytes()

    forced = gembatch(emulator, tmp_path, "submit", "--force", "a.jsonl")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    old, new = ledger(tmp_path)
    assert new["result_file"] == str(tmp_path / "results" / f"a.{new['id']}.jsonl")
    assert f"results will go to {new['result_file']}" in forced.stdout
    assert f"job {old['id']}'s results" in forced.stdout
    assert gembatch(emulator, tmp_path, "poll", "--interval", "0.2").returncode == 0

    assert (tmp_path / "results" / "a.jsonl").read_bytes() == first  # not overwritten
    second = [json.loads(line) for line in Path(new["result_file"]).read_text().splitlines()]
    assert sorted(line["key"] for line in second) == sorted(keys_of(path))
    results = gembatch(emulator, tmp_path, "results", new["id"])
    assert results.returncode == 0
