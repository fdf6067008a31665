"""Many processes on one ledger: no lost jobs, no torn file, no stale lock, clear lock errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gembatch.ledger import LedgerLockedError
from gembatch.ledger.jsonl import JsonlLedger

HOLD_LOCK = """
import sys, time
from gembatch.ledger.jsonl import JsonlLedger
ledger = JsonlLedger(sys.argv[1])
with ledger.locked():
    print("locked", flush=True)
    time.sleep(120)
"""


def start_lock_holder(path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_timeout_names_the_ledger_the_lock_file_and_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    holder = start_lock_holder(path)
    try:
        with pytest.raises(LedgerLockedError) as caught:
            JsonlLedger(path, timeout=0.2).load()
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert str(path) in message
    assert f"{path}.lock" in message
    assert f"pid {holder.pid}" in message
    assert "python -c" in message  # the holder's command line
    assert "since " in message
    assert "wait for it to finish or stop it" in message
    assert caught.value.exit_code != 0


def test_info_reports_a_locked_ledger_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_text('{"id": "a", "input_file": "a.jsonl", "batch": {"name": "b"}, "count": 1}\n')
    holder = start_lock_holder(path)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gembatch", "info", "--lock-timeout", "0.3", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert result.stderr.startswith("error: ")
    assert f"pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr


def test_killed_lock_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    holder = start_lock_holder(path)
    with pytest.raises(LedgerLockedError):
        JsonlLedger(path, timeout=0).load()  # really held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # timeout=0 is a single attempt: it succeeds only if the lock is free right now.
    ledger = JsonlLedger(path, timeout=0)
    assert ledger.add({"id": "after-kill"})
    assert ledger.load().records == [{"id": "after-kill"}]


# -- 8 writers adding while a ninth rewrites everything ----------------------------------

WRITERS = 8
JOBS_PER_WRITER = 200


def _add_jobs(path: str, writer: int) -> None:
    ledger = JsonlLedger(path, timeout=120, retry_interval=0.002)
    for n in range(JOBS_PER_WRITER):
        record = {"id": f"w{writer}-{n}", "input_file": f"in/{writer}/{n}.jsonl", "progress": 0}
        if not ledger.add(record):
            raise SystemExit(f"add of {record['id']} returned False")


def _rewrite_everything(path: str, stop: multiprocessing.synchronize.Event, rounds: object) -> None:
    ledger = JsonlLedger(path, timeout=120, retry_interval=0.002)
    done = 0
    while not stop.is_set():
        records = ledger.load().records
        if records:
            ledger.update_many([{**r, "progress": r.get("progress", 0) + 1} for r in records])
            done += 1
        time.sleep(0.05)  # leave the writers room: this is a poll loop, not a busy loop
    rounds.value = done  # type: ignore[attr-defined]


def test_concurrent_adds_and_bulk_rewrites_lose_no_job(tmp_path: Path) -> None:
    path = str(tmp_path / "job-info.jsonl")
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    rounds = context.Value("i", 0)
    rewriter = context.Process(target=_rewrite_everything, args=(path, stop, rounds))
    rewriter.start()
    writers = [context.Process(target=_add_jobs, args=(path, w)) for w in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=240)
    stop.set()
    rewriter.join(timeout=60)
    assert [p.exitcode for p in writers] == [0] * WRITERS
    assert rewriter.exitcode == 0

    raw_lines = Path(path).read_bytes().split(b"\n")
    assert raw_lines[-1] == b""
    parsed = [json.loads(line) for line in raw_lines[:-1]]  # every line parses
    assert len(parsed) == WRITERS * JOBS_PER_WRITER
    expected = {f"w{w}-{n}" for w in range(WRITERS) for n in range(JOBS_PER_WRITER)}
    assert {record["id"] for record in parsed} == expected
    snapshot = JsonlLedger(path).load()
    assert snapshot.problems == []
    print(f"{rounds.value} full rewrites ran during the adds")
    assert rounds.value > 0
    assert any(record["progress"] > 0 for record in parsed)  # the rewrites did land


# -- a writer killed at a random instant inside a big rewrite ----------------------------

KILL_RUNS = 200
RECORDS = 500


def _versions() -> tuple[list[dict], bytes, list[dict], bytes]:
    pad = "x" * 1500
    a = [
        {"id": f"job-{n}", "input_file": f"in/{n}.jsonl", "v": "A", "pad": pad}
        for n in range(RECORDS)
    ]
    b = [{**record, "v": "B", "progress": {"done": n}} for n, record in enumerate(a)]

    def encode(records: list[dict]) -> bytes:
        return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)

    return a, encode(a), b, encode(b)


def _run_writer(ledger: JsonlLedger, records: list[dict]) -> int:
    pid = os.fork()
    if pid == 0:  # the child: rewrite everything, then leave without any cleanup
        code = 1
        try:
            ledger.update_many(records)
            code = 0
        finally:
            os._exit(code)
    return pid


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_killed_writer_never_leaves_a_torn_ledger(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    records_a, bytes_a, records_b, bytes_b = _versions()
    path.write_bytes(bytes_a)
    ledger = JsonlLedger(path)
    ledger.load()  # children inherit the parsed file, so they reach the write sooner

    # How long one unkilled rewrite takes here, so that the kills spread over it.
    durations = []
    for records in (records_b, records_a, records_b, records_a):
        started = time.perf_counter()
        _, status = os.waitpid(_run_writer(ledger, records), 0)
        durations.append(time.perf_counter() - started)
        assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_bytes() == bytes_a
    span = statistics.median(durations) * 1.2

    rng = random.Random(20250714)
    killed_mid_write = 0
    for _ in range(KILL_RUNS):
        before = path.read_bytes()
        target = records_b if before == bytes_a else records_a
        pid = _run_writer(ledger, target)
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

        after = path.read_bytes()
        assert after in (bytes_a, bytes_b), "the ledger is torn, mixed or missing"
        assert after in (before, bytes_b if target is records_b else bytes_a)
        if _temps(tmp_path):
            killed_mid_write += 1
        with JsonlLedger(path, timeout=0).locked():  # one attempt: the lock is free at once
            pass

    print(f"{killed_mid_write} of {KILL_RUNS} kills landed inside a write")
    assert killed_mid_write > 0, "no kill landed inside a write; the test proved nothing"
    # The next writer removes what the killed ones left behind.
    current = path.read_bytes()
    JsonlLedger(path).update_many(records_b if current == bytes_a else records_a)
    assert _temps(tmp_path) == []
    assert JsonlLedger(path).load().problems == []


def test_lock_held_by_this_same_process_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    with JsonlLedger(path).locked(), pytest.raises(LedgerLockedError) as caught:
        JsonlLedger(path, timeout=0.05).load()
    assert "this same process" in str(caught.value)
