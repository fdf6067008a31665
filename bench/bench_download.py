"""Benchmark: downloading a 1 GiB results file (SPEC §11: peak RSS <= 100 MiB, throughput
>= 70 % of `curl` fetching the same file from the same emulator).

Why: a results file can be as large as its 2 GB input; the engine must stream it to disk
and verify every key without holding it in memory, at close to the speed of the wire. The
bound is `curl` downloading the same file from the same emulator in the same run (rounds
interleaved); the figure is the engine's whole download step in a process of its own
(`Engine.download`: stream to a temp file, fsync, verify every key, rename, one ledger
write), its peak RSS as the kernel reports it for that process.

    python bench/bench_download.py [--size-mib 1024] [--line-kib 16] [--repeat 3]

Set-up: one input of N requests whose `[[emulator:words=W]]` directive makes each answer
about --line-kib KiB; the engine submits it and polls until the emulator has generated
the output (about 20 s per GiB). Exit status 1 when a target is missed (never with
--no-target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import httpx

from gembatch.engine.engine import CycleReport, Engine
from gembatch.gemini.remote import Remote
from gembatch.inputs import validate_files
from gembatch.jobs import Job, TaskState
from gembatch.ledger.jsonl import JsonlLedger

MODEL = "models/gemini-2.5-flash-lite"
TARGET_RSS_MIB = 100.0
TARGET_RATIO = 0.70
CURL = shutil.which("curl")


def emulator_config() -> dict[str, Any]:
    # The batch runs at once; the output is generated as soon as it runs.
    return {"clock": {"pending_seconds": 0.1, "running_seconds": 0.2}}


# -- set-up ---------------------------------------------------------------------------------


def words_for(line_bytes: int) -> int:
    """Words per answer that make an output line of about `line_bytes` (measured with the
    emulator's own responder: its prose averages ~6.8 bytes per word)."""
    from gembatch.emulator.responders import LocalResponder

    probe = 2000
    reply = LocalResponder(0).reply(_request(0, probe), MODEL)
    size = len(json.dumps({"key": "k000000", "response": reply.response}, ensure_ascii=False))
    per_word = size / probe
    return max(1, round(line_bytes / per_word))


def _request(n: int, words: int) -> dict[str, Any]:
    text = f"Describe item {n} in detail. [[emulator:words={words}]]"
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def write_input(path: Path, size: int, line_bytes: int) -> int:
    words = words_for(line_bytes)
    count = max(1, math.ceil(size / line_bytes))
    with open(path, "w") as out:
        for n in range(count):
            out.write(json.dumps({"key": f"k{n:06d}", "request": _request(n, words)}) + "\n")
    return count


async def submit_and_wait(ledger: JsonlLedger, base_url: str, api_key: str, path: Path) -> Job:
    """Submit the input with the engine and poll until its batch has SUCCEEDED (not
    downloaded: the download is what is measured)."""
    async with Remote(api_key, base_url, concurrency=4) as remote:
        engine = Engine(ledger, remote)
        engine.add_jobs(validate_files([path]), model=MODEL)
        outcomes = await engine.start()
        if not all(o.ok for o in outcomes):
            raise RuntimeError(f"submit failed: {outcomes}")
        while True:
            await engine.poll(CycleReport())
            job = engine.jobs()[0]
            if job.tasks[0].state is TaskState.SUCCEEDED:
                return job
            if job.status.terminal:
                raise RuntimeError(f"the batch ended {job.status.value}: {job.error}")
            await asyncio.sleep(0.5)


# -- the measured process --------------------------------------------------------------------


async def _child(ledger_path: Path, base_url: str, api_key: str) -> dict[str, Any]:
    """The engine's download step for every succeeded task of the ledger (one here)."""
    from gembatch.engine import engine as engine_module

    ledger = JsonlLedger(ledger_path)
    timings: dict[str, float] = {"stream": 0.0, "verify": 0.0}
    async with Remote(api_key, base_url, concurrency=4) as remote:
        engine = Engine(ledger, remote)
        engine.jobs()  # the ledger parsed: what a poll process has done before any download
        download, verify = remote.download, engine_module.verify_output

        async def timed_download(name: str, destination: Any) -> int:
            started = time.perf_counter()
            try:
                return await download(name, destination)
            finally:
                timings["stream"] += time.perf_counter() - started

        def timed_verify(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return verify(*args)
            finally:
                timings["verify"] += time.perf_counter() - started

        remote.download = timed_download  # type: ignore[method-assign]
        engine_module.verify_output = timed_verify  # type: ignore[assignment]
        before = _memory_mib("VmHWM")
        report = CycleReport()
        started = time.perf_counter()
        await engine.download(report)
        total = time.perf_counter() - started
        job = engine.jobs()[0]
    return {
        "peak_rss_mib": _memory_mib("VmHWM"),
        "total": total,
        "stream": timings["stream"],
        "verify": timings["verify"],
        "rss_before_mib": before,
        "errors": report.errors,
        "state": job.tasks[0].state.value,
        "part": job.tasks[0].part_file,
    }


def _memory_mib(field: str) -> float:
    """A line of /proc/self/status in MiB. VmHWM is this process's own peak RSS; the
    rusage ru_maxrss a parent gets from wait4 is not: Linux carries the forking parent's
    RSS at fork time into it, and this script's parent holds the set-up."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(workdir: Path, snapshot: Path, base_url: str, api_key: str) -> dict[str, Any]:
    """One engine download in a fresh process, from the ledger as set-up left it; returns
    its timings and the peak RSS the kernel recorded for it."""
    ledger_path = workdir / "job-info.jsonl"
    shutil.copyfile(snapshot, ledger_path)
    cmd = [sys.executable, __file__, "--child", str(ledger_path), base_url, api_key]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the download process failed ({proc.returncode}): {proc.stdout}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    part = Path(result["part"]) if result["part"] else None
    result["bytes"] = part.stat().st_size if part and part.exists() else 0
    if part:
        part.unlink(missing_ok=True)
    return result


def remote_size(base_url: str, api_key: str, file_name: str) -> int:
    response = httpx.get(
        f"{base_url}/{_common.API}/{file_name}", headers={"x-goog-api-key": api_key}, timeout=30
    )
    response.raise_for_status()
    return int(response.json()["sizeBytes"])


def run_curl(url: str, api_key: str, dest: Path) -> dict[str, Any]:
    """`curl` fetching the same file to the same disk (no fsync: curl never does)."""
    assert CURL
    cmd = [CURL, "-sS", "--fail", "-o", str(dest), "-H", f"x-goog-api-key: {api_key}",
           "-w", "%{size_download} %{time_total}", url]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    size, seconds = out.split()
    dest.unlink(missing_ok=True)
    return {"bytes": int(float(size)), "seconds": float(seconds)}


# -- report ---------------------------------------------------------------------------------


def report(args: argparse.Namespace, size: int, lines: int, setup_s: float, rounds: list) -> bool:
    mib = 1024 * 1024
    engine = [r["engine"] for r in rounds]
    curls = [r["curl"] for r in rounds]
    e_rate = statistics.median(size / r["total"] for r in engine) / mib
    s_rate = statistics.median(size / r["stream"] for r in engine) / mib
    c_rate = statistics.median(c["bytes"] / c["seconds"] for c in curls) / mib
    peak = max(r["peak_rss_mib"] for r in engine)
    ratio = e_rate / c_rate
    rss_ok = peak <= TARGET_RSS_MIB
    rate_ok = ratio >= TARGET_RATIO
    print(
        f"download: one results file of {size / mib:,.0f} MiB ({lines:,} lines), engine "
        f"download step in its own process vs curl, {len(rounds)} rounds interleaved "
        f"(set-up {setup_s:.1f} s)"
    )
    med = sorted(engine, key=lambda r: r["total"])[len(engine) // 2]
    print(
        f"  engine: {e_rate:.0f} MiB/s (median; {med['total']:.2f} s = stream to disk "
        f"{med['stream']:.2f} s + verify {med['verify']:.2f} s + fsync, rename and ledger "
        f"writes {med['total'] - med['stream'] - med['verify']:.2f} s)"
    )
    print(f"  stream alone (Remote.download into the temp file): {s_rate:.0f} MiB/s")
    print(f"  bound: curl on the same file from the same emulator: {c_rate:.0f} MiB/s")
    print(
        f"  throughput ratio {ratio:.2f}; target >= {TARGET_RATIO:.2f}: "
        f"{'ok' if rate_ok else 'MISSED'} (stream alone {s_rate / c_rate:.2f})"
    )
    before = max(r["rss_before_mib"] for r in engine)
    print(
        f"  peak RSS of the download process: {peak:.1f} MiB (before the download "
        f"{before:.1f} MiB: interpreter, SDK, engine); target <= {TARGET_RSS_MIB:.0f} MiB: "
        f"{'ok' if rss_ok else 'MISSED'} ({peak / TARGET_RSS_MIB:.2f} x target)"
    )
    print(
        "  rounds (engine s / curl s): "
        + ", ".join(f"{r['engine']['total']:.2f}/{r['curl']['seconds']:.2f}" for r in rounds)
    )
    return rss_ok and rate_ok


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        ledger_path, base_url, api_key = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
        print(json.dumps(asyncio.run(_child(ledger_path, base_url, api_key))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--line-kib", type=float, default=16, help="bytes per output line")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--no-target", action="store_true", help="always exit 0 (smoke tests)")
    args = parser.parse_args()
    if CURL is None:
        print("download: curl is not installed (apt-get install curl): no bound to compare with")
        return 0 if args.no_target else 1

    with tempfile.TemporaryDirectory(prefix="gembatch-bench-download-") as tmp:
        workdir = Path(tmp)
        emulator = _common.start_emulator(emulator_config(), state_dir=workdir / "emulator")
        try:
            started = time.perf_counter()
            path = workdir / "input.jsonl"
            lines = write_input(path, int(args.size_mib * 1024 * 1024), int(args.line_kib * 1024))
            ledger = JsonlLedger(workdir / "job-info.jsonl")
            job = asyncio.run(submit_and_wait(ledger, emulator.base_url, emulator.api_key, path))
            setup_s = time.perf_counter() - started
            snapshot = workdir / "job-info.snapshot.jsonl"
            shutil.copyfile(workdir / "job-info.jsonl", snapshot)
            output = job.tasks[0].output_file
            assert output
            size = remote_size(emulator.base_url, emulator.api_key, output)
            url = f"{emulator.base_url}/{_common.API}/{output}:download?alt=media"
            rounds = []
            for n in range(max(1, args.repeat)):
                # Alternate which goes first: the page cache and the neighbours' load
                # favour neither.
                if n % 2 == 0:
                    c = run_curl(url, emulator.api_key, workdir / "curl.out")
                    e = run_child(workdir, snapshot, emulator.base_url, emulator.api_key)
                else:
                    e = run_child(workdir, snapshot, emulator.base_url, emulator.api_key)
                    c = run_curl(url, emulator.api_key, workdir / "curl.out")
                if e["errors"] or e["state"] != TaskState.DOWNLOADED.value:
                    raise RuntimeError(f"the engine's download failed: {e}")
                if c["bytes"] != size or e["bytes"] < size:
                    raise RuntimeError(f"short download: curl {c}, engine {e}, file {size}")
                rounds.append({"engine": e, "curl": c})
        finally:
            emulator.close()
    print(f"machine: {_common.machine_note()}, load average {os.getloadavg()[0]:.1f}")
    ok = report(args, size, lines, setup_s, rounds)
    return 0 if ok or args.no_target else 1


if __name__ == "__main__":
    sys.exit(main())
