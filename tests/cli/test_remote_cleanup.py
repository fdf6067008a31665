"""Nothing left behind remotely: deletes that fail (500, 429) are retried with backoff until
done, after the jobs have ended too, and shown meanwhile; the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cli.helpers import (
    FAST_ENGINE,
    Background,
    gembatch,
    keys_of,
    ledger,
    request_file,
    results_of,
)
from tests.conftest import wait_for

FAST = {"clock": {"pending_seconds": 0.2, "running_seconds": 0.6}}
DELETE_FAULTS = [
    {"endpoint": "files.delete", "status": 500},
    {"endpoint": "batches.delete", "status": 429, "retry_after_seconds": 0.2},
]
# Retries of a failed delete come back quickly: the test waits seconds, not minutes.
ENGINE = json.dumps(
    {**json.loads(FAST_ENGINE), "cleanup_retry_interval": 0.2, "cleanup_max_interval": 1.0}
)


def test_deletes_that_failed_are_retried_after_the_jobs_ended_until_the_remote_is_clean(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({**FAST, "faults": {"rules": DELETE_FAULTS}})
    files = [request_file(tmp_path / f"f{i}.jsonl", 3, prefix=f"f{i}-") for i in range(3)]
    env = {"GEMBATCH_ENGINE": ENGINE}
    submitted = gembatch(emulator, tmp_path, "submit", *[f.name for f in files], env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    poll = Background(emulator, tmp_path, "poll", "--interval", "0.2", **env)
    try:
        # Every job ends with its results; the deletes keep failing, more often than the
        # three tries (of six files) cleanup used to get, and the poll goes on.
        wait_for(lambda: {r["status"] for r in ledger(tmp_path)} == {"completed"}, timeout=60)
        wait_for(lambda: emulator.stats()["faults"].get("files.delete", 0) > 18, timeout=60)
        assert poll.proc.poll() is None, poll.output()
        for path in files:
            assert sorted(results_of(path)) == sorted(keys_of(path))
        shown = json.loads(gembatch(emulator, tmp_path, "status", "--json").stdout)
        # input file, batch and output file of each job
        assert [job["remote_cleanup_pending"] for job in shown] == [3, 3, 3], shown
        table = " ".join(gembatch(emulator, tmp_path, "status").stdout.split())
        assert "Success, cleanup pending: 3" in table, table
        stats = emulator.stats()
        assert stats["files"] == 6 and sum(stats["batches"].values()) == 3  # inputs, outputs

        emulator.set_config({"faults": {"rules": []}})  # the faults end

        assert poll.wait(timeout=60) == 0, poll.output()  # ends once the remote is clean
    finally:
        poll.kill()
    stats = emulator.stats()
    assert stats["files"] == 0 and stats["batches"] == {}, stats
    shown = json.loads(gembatch(emulator, tmp_path, "status", "--json").stdout)
    assert [job["remote_cleanup_pending"] for job in shown] == [0, 0, 0]
    assert "remote cleanup pending" not in poll.output().splitlines()[-1]


def test_a_new_poll_finishes_the_cleanup_a_stopped_one_left(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory({**FAST, "faults": {"rules": DELETE_FAULTS}})
    request_file(tmp_path / "a.jsonl", 3)
    env = {"GEMBATCH_ENGINE": ENGINE}
    poll = Background(emulator, tmp_path, "run", "--interval", "0.2", "a.jsonl", **env)
    try:
        wait_for(lambda: [r["status"] for r in ledger(tmp_path)] == ["completed"], timeout=60)
        wait_for(lambda: emulator.stats()["faults"].get("batches.delete", 0) >= 2, timeout=60)
    finally:
        poll.kill()  # Ctrl-C or a kill: the job is finished, its leftovers are not
    assert emulator.stats()["files"] == 2
    emulator.set_config({"faults": {"rules": []}})

    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2", env=env)

    assert polled.returncode == 0, polled.stdout + polled.stderr
    stats = emulator.stats()
    assert stats["files"] == 0 and stats["batches"] == {}, stats


def test_a_poll_whose_deletes_keep_failing_exits_after_the_cleanup_wait_saying_so(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """A delete refused for good (here a 403 on every files.delete) must not keep `poll`
    running for ever once the jobs have ended: it retries for --cleanup-wait seconds, then
    exits with the jobs' own outcome and says what is left and how to delete it."""
    refused = [{"endpoint": "files.delete", "status": 403, "message": "key revoked"}]
    emulator = emulator_factory({**FAST, "faults": {"rules": refused}})
    request_file(tmp_path / "a.jsonl", 3)
    env = {"GEMBATCH_ENGINE": ENGINE}
    done = gembatch(
        emulator, tmp_path, "run", "--interval", "0.2", "--cleanup-wait", "2", "a.jsonl", env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr  # the job itself completed
    assert [r["status"] for r in ledger(tmp_path)] == ["completed"]
    assert emulator.stats()["faults"].get("files.delete", 0) >= 4  # retried meanwhile
    assert "could not be deleted yet" in done.stderr, done.stderr
    assert "gembatch cleanup" in done.stderr
    shown = json.loads(gembatch(emulator, tmp_path, "status", "--json").stdout)
    assert shown[0]["remote_cleanup_pending"] == 2  # the input and the output file
