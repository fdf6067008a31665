"""Many processes on one ledger: no lost jobs, no torn file, no stale lock, clear lock errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from gembatch import fsutil
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
RECORDS = 100
PAD = 40_000  # 100 records of 40 kB: a 4 MB ledger, whose write takes milliseconds


def _versions() -> tuple[list[dict], bytes, list[dict], bytes]:
    pad = "x" * PAD
    a = [
        {"id": f"job-{n}", "input_file": f"in/{n}.jsonl", "v": "A", "pad": pad}
        for n in range(RECORDS)
    ]
    b = [{**record, "v": "B", "progress": {"done": n}} for n, record in enumerate(a)]

    def encode(records: list[dict]) -> bytes:
        return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)

    return a, encode(a), b, encode(b)


def _start_writer(ledger: JsonlLedger, records: list[dict]) -> tuple[int, int]:
    """Fork a child that rewrites the ledger with `records` through the real code path;
    return its pid and the read end of a pipe on which it reports the end of its write.

    The write is everything `fsutil.atomic_write_bytes` does: create the temp file beside
    the ledger, write and fsync it, rename it over the ledger, fsync the directory. The
    child stops itself (SIGSTOP) the moment the temp file exists (empty, the lock held);
    the parent resumes it with SIGCONT and is already awake and timing, so a kill it sends
    a chosen offset later lands inside the write rather than wherever scheduling left it.
    When the directory fsync has returned (the write is over), the child writes to the pipe
    how long the write took since it was resumed: a killed child that wrote nothing was
    killed inside its write.
    """
    read_end, write_end = os.pipe()
    prefix = f".{ledger.path.name}."
    pid = os.fork()
    if pid != 0:
        os.close(write_end)
        return pid, read_end
    code = 1  # the child: rewrite everything, then leave without any cleanup
    try:
        os.close(read_end)
        real_mkstemp, real_fsync_dir = tempfile.mkstemp, fsutil.fsync_dir
        resumed: list[float] = []

        def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, name = real_mkstemp(*args, **kwargs)
            if os.path.basename(name).startswith(prefix):
                os.kill(os.getpid(), signal.SIGSTOP)
                resumed.append(time.monotonic())
            return fd, name

        def fsync_dir(path: Any) -> None:
            real_fsync_dir(path)
            if resumed:
                os.write(write_end, struct.pack("d", time.monotonic() - resumed[0]))

        tempfile.mkstemp = mkstemp  # type: ignore[assignment]
        fsutil.fsync_dir = fsync_dir  # type: ignore[assignment]
        ledger.update_many(records)
        code = 0 if resumed else 3  # 3: the write never went through a temp file
    finally:
        os._exit(code)


def _wait_until_stopped_in_the_write(pid: int) -> None:
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the writer ended before its write began ({status:#x})"


def _write_time(read_end: int) -> float | None:
    """What a finished child reported: its write's duration; None if it never finished."""
    data = os.read(read_end, 64)
    os.close(read_end)
    return struct.unpack("d", data)[0] if data else None


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def _measured_write_time(ledger: JsonlLedger, versions: list[list[dict]]) -> float:
    """The shortest of several unkilled writes, from resuming to the directory fsync."""
    times = []
    for records in versions:
        pid, report = _start_writer(ledger, records)
        _wait_until_stopped_in_the_write(pid)
        os.kill(pid, signal.SIGCONT)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        took = _write_time(report)
        assert took is not None
        times.append(took)
        ledger.load()
    print(f"unkilled writes (ms): {[round(t * 1000, 2) for t in times]}")
    return min(times)


def test_killed_writer_never_leaves_a_torn_ledger(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    records_a, bytes_a, records_b, bytes_b = _versions()
    path.write_bytes(bytes_a)
    ledger = JsonlLedger(path)
    ledger.load()  # children inherit the parsed file, so they reach the write sooner

    # Kills are aimed at the first 80 % of the shortest write measured here; the rest is
    # margin for the child being quicker. A kill counts as sent inside the write when it
    # went out within that shortest write.
    window = _measured_write_time(ledger, [records_b, records_a] * 4)
    aim = 0.8 * window
    assert path.read_bytes() == bytes_a
    assert _temps(tmp_path) == []

    rng = random.Random(20250714)
    on_time = late = 0
    before_rename: list[int] = []  # the temp file's size when the kill landed
    after_rename = finished = 0
    while on_time < KILL_RUNS:
        before = path.read_bytes()
        target, new = (records_b, bytes_b) if before == bytes_a else (records_a, bytes_a)
        pid, report = _start_writer(ledger, target)
        _wait_until_stopped_in_the_write(pid)
        temps = _temps(tmp_path)  # the previous run's leftover was removed under the lock
        assert len(temps) == 1 and temps[0].stat().st_size == 0
        os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(rng.uniform(0, aim))
        sent_on_time = time.monotonic() - resumed <= window
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done = _write_time(report) is not None

        # Every run, on time or not: the old bytes or the new ones, whole, and no lock left.
        after = path.read_bytes()
        assert after in (bytes_a, bytes_b), "the ledger is torn, mixed or missing"
        if temps[0].exists():  # killed before the rename: the old ledger, untouched
            assert not done and after == before
        else:  # renamed: the new ledger (killed while fsyncing the directory, or done)
            assert after == new
        with JsonlLedger(path, timeout=0).locked():  # one attempt: the lock is free at once
            pass
        ledger.load()
        # A kill this process sent late (it was not scheduled in time, on a busy machine)
        # was not aimed at an instant of the write: it is checked above, not counted below.
        if not sent_on_time:
            late += 1
            assert late <= KILL_RUNS, "the machine is too busy to aim kills inside a write"
            continue
        on_time += 1
        if temps[0].exists():
            before_rename.append(temps[0].stat().st_size)
        elif done:
            finished += 1
        else:
            after_rename += 1

    inside = len(before_rename) + after_rename
    empty = before_rename.count(0)
    full = before_rename.count(len(bytes_a))
    print(
        f"{inside} of {KILL_RUNS} kills landed inside a write ({late} more sent late): "
        f"before the rename with the temp file empty {empty}, partly written "
        f"{len(before_rename) - empty - full}, complete {full}; after the rename "
        f"{after_rename}; shortest write {window * 1000:.2f} ms"
    )
    assert inside >= KILL_RUNS - 10, f"only {inside} of {KILL_RUNS} kills landed inside a write"
    assert before_rename, "no kill landed before a rename: the old-content case went untested"
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


# -- a corrupted line across separate processes ------------------------------------------

REWRITE_ALL = """
import sys
from gembatch.ledger.jsonl import JsonlLedger
ledger = JsonlLedger(sys.argv[1])
n = int(sys.argv[2])
records = ledger.load().records
assert ledger.update_many([{**r, "rewrites": n} for r in records]) == len(records)
assert ledger.add({"id": f"added-{n}", "input_file": f"in/added-{n}.jsonl", "count": 1})
print(ledger.writes)
"""
# Cut off mid-record by a crash of some other tool, with a Latin-1 byte in it.
CORRUPTED = b'{"id": "job-x", "input_file": "caf\xe9.jsonl", "batch": {"name": "batc'


def test_a_corrupted_line_survives_10_rewriting_processes_and_each_reports_its_number(
    tmp_path: Path,
) -> None:
    path = tmp_path / "job-info.jsonl"
    good = [{"id": f"job-{n}", "input_file": f"in/{n}.jsonl", "count": 2} for n in range(3)]
    lines = [json.dumps(r).encode() for r in good]
    path.write_bytes(b"\n".join([lines[0], lines[1], CORRUPTED, lines[2]]) + b"\n")
    expected_report = (
        f"{path}:3: not UTF-8 (byte 0xe9 at column 35); "
        "the line is kept as it is: fix or delete it by hand"
    )
    for n in range(10):
        rewrite = subprocess.run(
            [sys.executable, "-c", REWRITE_ALL, str(path), str(n)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rewrite.returncode == 0, rewrite.stderr
        assert rewrite.stdout.split() == ["2"]  # it did rewrite the whole file, twice
        raw = path.read_bytes().split(b"\n")
        assert raw[2] == CORRUPTED  # byte for byte, at the same place
        records = [json.loads(line) for i, line in enumerate(raw[:-1]) if i != 2]
        assert len(records) == 3 + n + 1
        assert all(r["rewrites"] == n for r in records[: 3 + n])

        status = subprocess.run(
            [sys.executable, "-m", "gembatch", "--job-info", str(path), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 1  # a problem was reported
        assert status.stderr.splitlines() == [expected_report]
        assert len(json.loads(status.stdout)) == len(records)
