"""Benchmark: one poll cycle over N active jobs (SPEC §11: 1,000 jobs, 50 ms per call).

Why: polling must be concurrent and bounded, so a cycle costs about
50 ms x ceil(N / concurrency), not N x 50 ms, and the ledger is written once. The bound is
computed from the workload (the emulator delays every batches.get by --latency-ms) and
printed beside the figure as a ratio; the target is <= 1.25 x that floor.

    python bench/bench_poll.py [--jobs 1000] [--concurrency 32] [--latency-ms 50]
    python bench/bench_poll.py --emulator-only     # the emulator's own requests/s

Set-up goes around gembatch's careful (slow) submit path: one tiny input uploaded with the
SDK, N batches created over raw HTTP, N job records built with the engine's reducers and
added to a job-info.jsonl in one write. The emulator keeps them PENDING for an hour.
Exit status 1 when the target is missed (never with --no-target).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

from gembatch.engine import reducers
from gembatch.engine.engine import CycleReport, Engine, EngineSettings
from gembatch.engine.owner import current_owner
from gembatch.gemini.remote import Remote, RemoteBatch
from gembatch.jobs import Job, RemoteState, RetryConfig
from gembatch.ledger.jsonl import JsonlLedger

MODEL = "models/gemini-2.5-flash-lite"
TARGET_RATIO = 1.25


def emulator_config(latency_ms: float) -> dict[str, Any]:
    return {
        "faults": {"rules": [{"endpoint": "batches.get", "latency_ms": latency_ms}]},
        "clock": {"pending_seconds": 3600},
        "limits": {"max_active_batches": 100000},
    }


# -- set-up ---------------------------------------------------------------------------------


def build_jobs(count: int, input_path: Path, now: float) -> list[Job]:
    """`count` pending jobs of one task each, up to the create intent (display names)."""
    owner = current_owner("bench")
    size = input_path.stat().st_size
    jobs = []
    for n in range(count):
        job = reducers.new_job(
            job_id=f"bench{n:06d}",
            input_file=f"inputs/part-{n:06d}.jsonl",
            input_path=str(input_path),
            sha256=f"{n:064x}",
            size_bytes=size,
            count=1,
            plans=[(0, size, 1)],
            model=MODEL,
            priority=0,
            retry_config=RetryConfig(),
            max_parallel_tasks=None,
            result_file=str(input_path.parent / "results" / f"part-{n:06d}.jsonl"),
            now=now,
        )
        job = reducers.claim_upload(job, 0, owner, now)
        jobs.append(job)
    return jobs


def submitted(job: Job, file_name: str, operation: dict[str, Any], now: float) -> Job:
    """The job as the engine leaves it once its batch exists (uploaded -> created)."""
    owner = current_owner("bench")
    metadata = operation.get("metadata", {})
    batch = RemoteBatch(
        name=operation["name"],
        display_name=metadata.get("displayName"),
        model=metadata.get("model"),
        state=RemoteState.parse("JOB_STATE_PENDING"),
        create_time=metadata.get("createTime"),
        update_time=metadata.get("updateTime"),
    )
    job = reducers.uploaded(job, 0, file_name, now)
    job = reducers.claim_create(job, 0, owner, now)
    return reducers.created(job, 0, batch.to_batch_dict(), now)


def set_up(base_url: str, api_key: str, jobs: int, workdir: Path) -> tuple[JsonlLedger, float]:
    """N live remote batches and a ledger whose N jobs wait on them; returns set-up time."""
    started = time.perf_counter()
    input_path = workdir / "input.jsonl"
    input_path.write_text(
        '{"key": "k1", "request": {"contents": [{"parts": [{"text": "hello"}]}]}}\n'
    )
    file_name = _common.upload_small_file(base_url, api_key)
    now = time.time()
    pending = build_jobs(jobs, input_path, now)
    operations = asyncio.run(
        _common.create_batches(
            base_url,
            api_key,
            file_name,
            [job.tasks[0].display_name for job in pending],
            model=MODEL,
        )
    )
    records = [
        submitted(job, file_name, op, now).to_record()
        for job, op in zip(pending, operations, strict=True)
    ]
    ledger = JsonlLedger(workdir / "job-info.jsonl")
    ledger.add_many(records)
    return ledger, time.perf_counter() - started


# -- measurement ----------------------------------------------------------------------------


class Timings:
    """What one poll phase spent where, gathered by wrapping the engine's collaborators
    (the engine itself is not changed)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first_get = math.inf
        self.last_answer = 0.0
        self.gets = 0
        self.reads = 0  # ledger.load calls: the file read and its records copied
        self.jobs_seconds = 0.0  # in Engine.jobs(): ledger.load + Job.from_record for all
        self.applies = 0
        self.apply_seconds = 0.0  # ledger.apply: reducers, serialising, the one write

    def wrap(self, engine: Engine, remote: Remote, ledger: JsonlLedger) -> None:
        get_batch, load, jobs, apply = remote.get_batch, ledger.load, engine.jobs, ledger.apply

        async def timed_get(name: str) -> RemoteBatch:
            self.first_get = min(self.first_get, time.perf_counter())
            try:
                return await get_batch(name)
            finally:
                self.last_answer = max(self.last_answer, time.perf_counter())
                self.gets += 1

        def counted_load() -> Any:
            self.reads += 1
            return load()

        def timed_jobs() -> list[Job]:
            started = time.perf_counter()
            try:
                return jobs()
            finally:
                self.jobs_seconds += time.perf_counter() - started

        def timed_apply(changes: Any) -> Any:
            started = time.perf_counter()
            try:
                return apply(changes)
            finally:
                self.applies += 1
                self.apply_seconds += time.perf_counter() - started

        remote.get_batch = timed_get  # type: ignore[method-assign]
        ledger.load = counted_load  # type: ignore[method-assign]
        engine.jobs = timed_jobs  # type: ignore[method-assign]
        ledger.apply = timed_apply  # type: ignore[method-assign]


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    base_url: str,
    api_key: str,
    ledger: JsonlLedger,
    concurrency: int,
    repeat: int,
    emulator_pid: int,
) -> dict[str, Any]:
    remote = Remote(api_key, base_url, concurrency=concurrency)
    engine = Engine(ledger, remote, EngineSettings(poll_concurrency=concurrency))
    timings = Timings()
    timings.wrap(engine, remote, ledger)
    rounds = []
    try:
        # One cold cycle first: connections are opened and the ledger parsed once, as in
        # the first cycle of a `gembatch poll` that then runs for hours.
        cold_started = time.perf_counter()
        await engine.poll(CycleReport())
        cold = time.perf_counter() - cold_started
        for _ in range(repeat):
            timings.reset()
            report = CycleReport()
            writes_before = ledger.writes
            cpu, emulator_cpu = _own_cpu(), _common.process_cpu(emulator_pid)
            started = time.perf_counter()
            await engine.poll(report)
            ended = time.perf_counter()
            cpu, emulator_cpu = _own_cpu() - cpu, _common.process_cpu(emulator_pid) - emulator_cpu
            rounds.append(
                {
                    "seconds": ended - started,
                    "polled": report.polled,
                    "errors": len(report.errors),
                    "writes": ledger.writes - writes_before,
                    "network": timings.last_answer - timings.first_get,
                    "before": timings.first_get - started,
                    "after": ended - timings.last_answer,
                    "reads": timings.reads,
                    "jobs_seconds": timings.jobs_seconds,
                    "applies": timings.applies,
                    "apply_seconds": timings.apply_seconds,
                    "cpu": cpu,
                    "emulator_cpu": emulator_cpu,
                }
            )
        cycle_started = time.perf_counter()
        cycle_report = await engine.cycle()
        cycle = time.perf_counter() - cycle_started
    finally:
        await remote.aclose()
    best = sorted(rounds, key=lambda r: r["seconds"])[len(rounds) // 2]  # the median round
    return {
        "cold": cold,
        "rounds": rounds,
        "median": best,
        "cycle": cycle,
        "cycle_polled": cycle_report.polled,
    }


def report_poll(args: argparse.Namespace, result: dict[str, Any], setup_s: float) -> bool:
    n, c, latency = args.jobs, args.concurrency, args.latency_ms / 1000
    floor = latency * math.ceil(n / c)
    figure = result["median"]["seconds"]
    ratio = figure / floor
    ok = ratio <= TARGET_RATIO
    m = result["median"]
    print(
        f"poll cycle: {n} active jobs, concurrency {c}, emulator adds {args.latency_ms:g} ms "
        f"per batches.get; median of {len(result['rounds'])} (set-up {setup_s:.1f} s)"
    )
    print(
        f"  engine.poll: {figure:.3f} s for {m['polled']} batches.get "
        f"({m['errors']} errors, {m['writes']} ledger write)"
    )
    print(f"  floor: {args.latency_ms:g} ms x ceil({n} / {c}) = {floor:.3f} s; ratio {ratio:.2f}")
    verdict = "ok" if ok else "MISSED"
    print(f"  target: <= {TARGET_RATIO} x floor = {TARGET_RATIO * floor:.3f} s: {verdict}")
    print(
        f"  split: network {m['network']:.3f} s (first batches.get sent .. last answer); "
        f"engine/ledger {m['before'] + m['after']:.3f} s "
        f"(before the calls {m['before']:.3f} s, after {m['after']:.3f} s)"
    )
    print(
        f"  engine/ledger detail: ledger read {m['reads']} x, jobs parsed "
        f"{m['jobs_seconds']:.3f} s; {m['applies']} x apply+write {m['apply_seconds']:.3f} s"
    )
    per_get = 1e3 / max(1, m["polled"])
    print(
        f"  CPU during the poll: this process {m['cpu']:.2f} s ({m['cpu'] * per_get:.2f} ms per "
        f"batches.get, all included), emulator {m['emulator_cpu']:.2f} s "
        f"({m['emulator_cpu'] * per_get:.2f} ms)"
    )
    print(f"  sequential polling would take {n} x {args.latency_ms:g} ms = {n * latency:.1f} s")
    print(
        f"  cold first poll (connections opened, ledger parsed): {result['cold']:.3f} s; "
        f"whole engine.cycle(): {result['cycle']:.3f} s for {result['cycle_polled']} polled"
    )
    rounds = ", ".join(f"{r['seconds']:.3f}" for r in result["rounds"])
    print(f"  rounds: {rounds} s")
    return ok


# -- emulator-only: requests/s of the emulator itself ---------------------------------------


def emulator_throughput(args: argparse.Namespace) -> None:
    config = emulator_config(0)
    config["faults"] = {}
    emulator = _common.start_emulator(config)
    try:
        base, key = emulator.base_url, emulator.api_key
        pid = emulator.proc.pid  # type: ignore[union-attr]
        file_name = _common.upload_small_file(base, key)
        names = [f"tp-{n:06d}" for n in range(args.jobs)]
        cpu0, started = _common.process_cpu(pid), time.perf_counter()
        operations = asyncio.run(_common.create_batches(base, key, file_name, names))
        wall = time.perf_counter() - started
        cpu = _common.process_cpu(pid) - cpu0
        print(
            f"emulator throughput ({_common.machine_note()}); {args.clients} keep-alive clients, "
            f"{args.jobs} batches"
        )
        print(
            f"  batches.create: {len(operations) / wall:7.0f} req/s "
            f"(16 clients; emulator CPU {1e6 * cpu / len(operations):.0f} us/req)"
        )
        loads = [
            ("batches.get", [("GET", f"/v1beta/{op['name']}", b"") for op in operations]),
            ("batches.list", [("GET", "/v1beta/batches?pageSize=100", b"")]),
            ("files.get", [("GET", f"/v1beta/{file_name}", b"")]),
            ("files.list", [("GET", "/v1beta/files?pageSize=100", b"")]),
        ]
        for label, requests in loads:
            cpu0 = _common.process_cpu(pid)
            result = asyncio.run(
                _common.hammer(base, requests, clients=args.clients, seconds=args.seconds)
            )
            cpu = _common.process_cpu(pid) - cpu0
            print(
                f"  {label + ':':14} {result.rate:7.0f} req/s ({result.errors} errors; "
                f"emulator CPU {1e6 * cpu / max(1, result.requests):.0f} us/req)"
            )
    finally:
        emulator.close()


def _run(uvloop: bool, coroutine: Any) -> Any:
    if not uvloop:
        return asyncio.run(coroutine)
    import uvloop as uvloop_module

    return uvloop_module.run(coroutine)


def main() -> int:
    from gembatch.runtime import tune_gc

    tune_gc()  # as every gembatch command does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=3, help="poll phases measured (median)")
    parser.add_argument("--no-target", action="store_true", help="always exit 0 (smoke tests)")
    parser.add_argument(
        "--uvloop", action="store_true", help="run this (client) process's event loop on uvloop"
    )
    parser.add_argument("--emulator-only", action="store_true", help="emulator requests/s")
    parser.add_argument("--clients", type=int, default=200, help="--emulator-only clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="--emulator-only duration")
    args = parser.parse_args()

    if args.emulator_only:
        emulator_throughput(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="gembatch-bench-poll-") as tmp:
        workdir = Path(tmp)
        emulator = _common.start_emulator(
            emulator_config(args.latency_ms), state_dir=workdir / "emulator"
        )
        try:
            ledger, setup_s = set_up(emulator.base_url, emulator.api_key, args.jobs, workdir)
            result = _run(
                args.uvloop,
                measure(
                    emulator.base_url,
                    emulator.api_key,
                    ledger,
                    args.concurrency,
                    max(1, args.repeat),
                    emulator.proc.pid,  # type: ignore[union-attr]
                ),
            )
        finally:
            emulator.close()
    if args.uvloop:
        print("(what-if: uvloop (client loop))")
    print(f"machine: {_common.machine_note()}, load average {os.getloadavg()[0]:.1f}")
    ok = report_poll(args, result, setup_s)
    if args.no_target:
        return 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
