"""Benchmark: how fast the command line starts (`--version`, `status` on 1,000 jobs).

Why: a command a user types many times a day must answer at once. `gembatch --version`
should cost little more than starting Python; `gembatch status` on a ledger of 1,000
finished jobs should not lay out a 1,000-row table nobody can see. Each command is timed
as a whole process, in pairs with `python -c pass` (the bound, measured in the same run
and interleaved with it, so a busy machine slows both alike), and printed as a ratio.

    python bench/bench_startup.py [--jobs 1000 --repeat 15]

Targets: `--version` at most 3x `python -c pass`, `status` (1,000 jobs, output to a pipe)
at most 4x. Exit status 1 when a target is missed (unless --no-target).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from gembatch.jobs import (  # noqa: E402
    Job,
    JobStatus,
    RemoteState,
    RequestCounts,
    Step,
    Task,
    TaskInput,
    TaskState,
)
from gembatch.ledger.jsonl import dumps_record  # noqa: E402

TARGETS = {"version": 3.0, "status": 4.0}


def finished_job(n: int) -> dict:
    """A job as gembatch leaves it once its one batch succeeded and was downloaded."""
    task = Task(
        index=0,
        attempt=1,
        state=TaskState.DONE,
        input=TaskInput(path=f"batch/input-{n:05d}.jsonl", count=100),
        display_name=f"gembatch-input-{n:05d}-j{n:016x}-t0a1",
        uploaded_file_name=f"files/upload{n:08d}",
        batch_name=f"batches/{n:08d}abcdef",
        remote_state=RemoteState.SUCCEEDED,
        requests=RequestCounts(total=100, succeeded=100 - n % 3, failed=n % 3),
        output_file=f"files/batch-{n:08d}",
        cleaned={"input_file": True, "batch": True, "output_file": True},
        created_at="2026-12-01T10:00:00+00:00",
        ended_at="2026-12-01T11:00:00+00:00",
    )
    job = Job(
        id=f"j{n:016x}",
        input_file=f"batch/input-{n:05d}.jsonl",
        status=JobStatus.COMPLETED,
        step=Step.FINALIZING,
        count=100,
        model="models/gemini-2.5-flash-lite",
        tasks=[task],
        result_file=f"batch/results/input-{n:05d}.jsonl",
        created_at="2026-12-01T10:00:00+00:00",
        updated_at="2026-12-01T11:00:00+00:00",
        completed_at="2026-12-01T11:00:00+00:00",
        final_state="JOB_STATE_SUCCEEDED",
        duration_seconds=3600,
    )
    return job.to_record()


def timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-500:]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=15, help="pairs per command")
    parser.add_argument("--no-target", action="store_true", help="print, never fail")
    args = parser.parse_args()

    python = sys.executable
    gembatch = [python, "-m", "gembatch"]
    with tempfile.TemporaryDirectory(prefix="gembatch-bench-startup-") as work:
        cwd = Path(work)
        with open(cwd / "job-info.jsonl", "wb") as handle:
            for n in range(args.jobs):
                handle.write(dumps_record(finished_job(n)) + b"\n")
        commands = {
            "version": [*gembatch, "--version"],
            "status": [*gembatch, "status"],
        }
        bare = [python, "-c", "pass"]
        env_note = f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
        print(f"start-up, {args.repeat} interleaved pairs per command ({env_note})")
        missed = []
        for name, argv in commands.items():
            timed(argv, cwd)  # warm the file cache and the bytecode
            ours, base = [], []
            for _ in range(args.repeat):
                ours.append(timed(argv, cwd))
                base.append(timed(bare, cwd))
            mine, bound = statistics.median(ours), statistics.median(base)
            ratio = mine / bound
            what = " ".join(argv[3:]) + (
                f" ({args.jobs:,} jobs, to a pipe)" if name == "status" else ""
            )
            held = ratio <= TARGETS[name]
            print(
                f"gembatch {what}: {mine * 1000:.0f} ms; bound: python -c pass "
                f"{bound * 1000:.0f} ms; ratio {ratio:.2f} (target <= {TARGETS[name]}: "
                f"{'held' if held else 'MISSED'})"
            )
            if not held:
                missed.append(name)
    return 1 if missed and not args.no_target else 0


if __name__ == "__main__":
    sys.exit(main())
