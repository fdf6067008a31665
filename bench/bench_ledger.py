"""Benchmark: one poll cycle's ledger write (SPEC §11: 1,000 of 10,000 jobs: 1 write, <= 0.2 s).

Why: the original tool rewrote the ledger per job; gembatch's `update_many` must turn a
whole cycle's updates into one write whose cost is close to writing the bytes at all. The
bound measured in the same run is a plain write + fsync + os.replace + directory fsync of
the same bytes, with no parsing, printed as a ratio.

    python bench/bench_ledger.py [--jobs 10000 --updates 1000 --repeat 5]

Exit status 1 when the target is missed (more than one write, or slower than --target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gembatch import fsutil
from gembatch.ledger.jsonl import JsonlLedger


def job_record(n: int) -> dict:
    """A realistic record: a v0.3.x job plus gembatch's own fields (about 600 bytes)."""
    return {
        "id": f"job-{n:06d}",
        "input_file": f"batch/input-{n:06d}.jsonl",
        "count": 1000 + n % 97,
        "uploaded_file_name": f"files/upload{n:08d}abcdef",
        "batch": {
            "name": f"batches/{n:08d}qwertyuiopasdfghjklzxcvbnm",
            "display_name": f"gembatch-input-{n:06d}",
            "model": "models/gemini-2.5-flash-lite",
            "state": "JOB_STATE_RUNNING",
            "create_time": "2025-07-12T16:01:38.750979+00:00",
            "update_time": "2025-07-12T16:03:05.823235+00:00",
        },
        "sha256": f"{n:064x}",
        "progress": {"total": 1000, "succeeded": n % 1000, "failed": 0},
        "attempts": 1,
        "priority": 0,
        "created_at": "2025-07-13T01:01:38.807581+09:00",
        "updated_at": "2025-07-13T01:01:38.807581+09:00",
    }


def finished(record: dict, round_no: int) -> dict:
    """The record as a poll cycle leaves it when its batch has just finished."""
    batch = {
        **record["batch"],
        "state": "JOB_STATE_SUCCEEDED",
        "end_time": f"2025-07-13T02:{round_no % 60:02d}:00+00:00",
        "dest": {"file_name": f"files/batch-{record['id']}-r{round_no}"},
    }
    return {
        **record,
        "batch": batch,
        "completed_at": f"2025-07-13T02:{round_no % 60:02d}:00+09:00",
        "final_state": "JOB_STATE_SUCCEEDED",
        "duration_seconds": 3600 + round_no,
    }


def plain_write(path: Path, data: bytes) -> float:
    """The bound: the same bytes written, fsynced and renamed into place, nothing else."""
    started = time.perf_counter()
    temp = path.with_name(f".{path.name}.bound.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsutil.fsync_dir(path.parent)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is reported")
    parser.add_argument("--target", type=float, default=0.2, help="seconds (SPEC §11)")
    args = parser.parse_args(argv)
    updates = min(args.updates, args.jobs)
    step = max(1, args.jobs // max(updates, 1))

    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        path = Path(tmp) / "job-info.jsonl"
        records = [job_record(n) for n in range(args.jobs)]
        fsutil.atomic_write_bytes(path, b"".join(json.dumps(r).encode() + b"\n" for r in records))
        size = path.stat().st_size

        warm_times, cold_times, bound_times, writes = [], [], [], []
        poller = JsonlLedger(path)  # a poll loop: it loaded the ledger earlier in its cycle
        for round_no in range(args.repeat):
            chosen = records[round_no % step :: step][:updates]

            # A fresh process: parses the whole file before updating.
            changed = [finished(r, 2 * round_no) for r in chosen]
            cold = JsonlLedger(path)
            started = time.perf_counter()
            matched = cold.update_many(changed)
            cold_times.append(time.perf_counter() - started)
            assert matched == len(changed)
            writes.append(cold.writes)

            # The poll loop's cycle: load, (poll the API), then write all results at once.
            poller.load()
            changed = [finished(r, 2 * round_no + 1) for r in chosen]
            started = time.perf_counter()
            poller.update_many(changed)
            warm_times.append(time.perf_counter() - started)

            bound_times.append(plain_write(path.with_name("bound.jsonl"), path.read_bytes()))

    warm = statistics.median(warm_times)
    cold = statistics.median(cold_times)
    bound = statistics.median(bound_times)
    one_write = all(n == 1 for n in writes) and poller.writes == args.repeat
    ok = one_write and warm <= args.target

    print(
        f"ledger write: {args.jobs} jobs ({size / 1e6:.1f} MB), {updates} updated by one "
        f"update_many call; median of {args.repeat}"
    )
    print(
        f"  poll cycle (ledger loaded this cycle): {warm:.3f} s, "
        f"{'1 write' if one_write else 'MORE THAN ONE WRITE'}; target <= {args.target:g} s: "
        f"{'ok' if ok else 'MISSED'} ({warm / args.target:.2f} x target)"
    )
    print(
        f"  fresh process (parses the whole file): {cold:.3f} s ({cold / args.target:.2f} x target)"
    )
    print(
        f"  bound, same run: plain write+fsync+replace of the same bytes {bound:.4f} s; "
        f"poll cycle = {warm / bound:.1f} x bound, fresh process = {cold / bound:.1f} x bound"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
