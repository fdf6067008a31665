"""Benchmark: `gembatch submit` of 100 files x 10 MB (SPEC §11: wall <= 1.3 x uploading the
same bytes with the same parallelism without validation).

Why: gembatch checks every line and hashes every byte before anything leaves the machine;
that care must cost little next to sending the files. Three runs per round, each a whole
process (interpreter start included) against a fresh emulator, in rotating order:

- `gembatch submit` of the files (validate, hash, upload, create, ledger);
- the bound: a bare loop that sends the same files through the same `Remote` with the
  same number of uploads in flight (EngineSettings.upload_concurrency) and creates one
  batch per file, with no validation, hashing or ledger. The creates belong in the bound
  because `gembatch submit` makes them too, and this emulator checks every request line
  when a batch is created (Gemini answers a create at once): that costs it far more CPU
  than receiving the bytes, and without it on both sides the figure would measure the
  emulator;
- the same bare loop without the creates (the SPEC's words taken literally), printed for
  information with gembatch's validation time alone.

    python bench/bench_submit.py [--files 100] [--file-mb 10] [--repeat 2]

Exit status 1 when the target (against the bound) is missed (never with --no-target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from gembatch.engine.engine import EngineSettings

MODEL = "models/gemini-2.5-flash-lite"
TARGET_RATIO = 1.3
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")


def emulator_config() -> dict[str, Any]:
    # Batches stay PENDING: no output is generated while the submit is timed.
    return {"clock": {"pending_seconds": 3600}, "limits": {"max_active_batches": 100000}}


# -- set-up ---------------------------------------------------------------------------------


def write_inputs(directory: Path, files: int, file_bytes: int, line_bytes: int) -> list[Path]:
    """`files` distinct request files of about `file_bytes` each (distinct keys and
    prompts: gembatch skips a file whose content it has seen)."""
    directory.mkdir(parents=True, exist_ok=True)
    filler = " ".join(WORDS[i % len(WORDS)] for i in range(line_bytes // 5))
    paths = []
    for f in range(files):
        lines = []
        size = n = 0
        while size < file_bytes:
            head = f'{{"key": "f{f:03d}-k{n:06d}", "request": {{"contents": [{{"role": "user", '
            text = f"Question {f}.{n}: {filler}"[: max(1, line_bytes - len(head) - 40)]
            line = f'{head}"parts": [{{"text": "{text}"}}]}}]}}}}\n'
            lines.append(line)
            size += len(line)
            n += 1
        path = directory / f"input-{f:03d}.jsonl"
        path.write_text("".join(lines))
        paths.append(path)
    return paths


# -- the two sides ----------------------------------------------------------------------------


def run_gembatch(workdir: Path, emulator: Any, paths: list[Path]) -> dict[str, Any]:
    ledger = workdir / "job-info.jsonl"
    ledger.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "gembatch", "--job-info", str(ledger), "submit",
           "--max-live-batches", str(len(paths)), *map(str, paths)]  # fmt: skip
    env = {**os.environ, **emulator.client_env()}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"gembatch submit failed:\n{proc.stdout}\n{proc.stderr}")
    submitted = proc.stdout.count(": submitted batches/")
    if submitted != len(paths):
        raise RuntimeError(f"{submitted} of {len(paths)} submitted:\n{proc.stdout}")
    return {"wall": wall}


async def _bare(
    base_url: str, api_key: str, concurrency: int, create: bool, paths: list[str]
) -> dict[str, float]:
    """Upload each file and (with `create`) create its batch, `concurrency` at a time:
    what the engine's start does per task, without anything of gembatch's own around it."""
    from gembatch.gemini.remote import Remote

    gate = asyncio.Semaphore(concurrency)
    uploaded_at: list[float] = []
    started = time.perf_counter()
    async with Remote(api_key, base_url, concurrency=32) as remote:

        async def one(path: str) -> None:
            async with gate:
                with open(path, "rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    name = await remote.upload(source, size, Path(path).name)
                uploaded_at.append(time.perf_counter())
                if create:
                    await remote.create_batch(MODEL, name, Path(path).stem)

        await asyncio.gather(*(one(p) for p in paths))
    return {"inside": time.perf_counter() - started, "uploads": max(uploaded_at) - started}


def run_bare(emulator: Any, paths: list[Path], concurrency: int, create: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--bare", emulator.base_url, emulator.api_key,
           str(concurrency), "create" if create else "upload", *map(str, paths)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the bare upload loop failed:\n{proc.stdout}\n{proc.stderr}")
    return {"wall": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def validation_alone(paths: list[Path]) -> float:
    """gembatch's local pass (validate + hash + split) over the same files, in this
    process: the part of its wall that has no counterpart in the bound."""
    from gembatch.inputs import validate_files

    started = time.perf_counter()
    validate_files(paths)
    return time.perf_counter() - started


def one_round(workdir: Path, paths: list[Path], kind: str, concurrency: int) -> dict[str, Any]:
    state = workdir / f"emulator-{kind}"
    emulator = _common.start_emulator(emulator_config(), state_dir=state)
    try:
        if kind == "gembatch":
            return run_gembatch(workdir, emulator, paths)
        return run_bare(emulator, paths, concurrency, create=kind == "bare")
    finally:
        emulator.close()
        shutil.rmtree(state, ignore_errors=True)


# -- report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, total: int, concurrency: int, rounds: list, validate_s: float
) -> bool:
    g = statistics.median(r["gembatch"]["wall"] for r in rounds)
    b = statistics.median(r["bare"]["wall"] for r in rounds)
    u = statistics.median(r["uploads"]["wall"] for r in rounds)
    ratio = g / b
    ok = ratio <= TARGET_RATIO
    mb = total / 1e6
    print(
        f"submit: {args.files} files x {args.file_mb:g} MB ({mb:,.0f} MB), {concurrency} uploads "
        f"in flight, a fresh emulator per run, {len(rounds)} rounds, medians"
    )
    print(f"  gembatch submit: {g:.2f} s wall ({mb / g:.1f} MB/s)")
    print(
        f"  bound: bare Remote loop, uploads + creates, same concurrency, no validation: "
        f"{b:.2f} s wall ({mb / b:.1f} MB/s)"
    )
    print(f"  ratio {ratio:.2f}; target <= {TARGET_RATIO}: {'ok' if ok else 'MISSED'}")
    print(
        f"  uploads alone (no creates): {u:.2f} s wall ({mb / u:.1f} MB/s); gembatch submit = "
        f"{g / u:.2f} x that; creating the batches cost the bare loop {b - u:.2f} s"
    )
    print(
        f"  gembatch's validation alone (validate + hash + split, one process): {validate_s:.2f} s "
        f"({mb / validate_s:.1f} MB/s) = {validate_s / u:.2f} x the uploads alone"
    )
    print(
        "  rounds (gembatch / bound / uploads alone, s): "
        + ", ".join(
            f"{r['gembatch']['wall']:.2f}/{r['bare']['wall']:.2f}/{r['uploads']['wall']:.2f}"
            for r in rounds
        )
    )
    return ok


def main() -> int:
    if len(sys.argv) > 5 and sys.argv[1] == "--bare":
        base_url, api_key, concurrency = sys.argv[2], sys.argv[3], int(sys.argv[4])
        create = sys.argv[5] == "create"
        result = asyncio.run(_bare(base_url, api_key, concurrency, create, sys.argv[6:]))
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--file-mb", type=float, default=10.0, help="MB (10^6 bytes) per file")
    parser.add_argument("--line-bytes", type=int, default=1000, help="bytes per request line")
    parser.add_argument("--repeat", type=int, default=2, help="rounds (medians reported)")
    parser.add_argument("--no-target", action="store_true", help="always exit 0 (smoke tests)")
    args = parser.parse_args()
    concurrency = EngineSettings().upload_concurrency

    with tempfile.TemporaryDirectory(prefix="gembatch-bench-submit-") as tmp:
        workdir = Path(tmp)
        paths = write_inputs(
            workdir / "inputs", args.files, int(args.file_mb * 1e6), args.line_bytes
        )
        total = sum(p.stat().st_size for p in paths)
        validate_s = validation_alone(paths)
        rounds = []
        kinds = ["bare", "gembatch", "uploads"]
        for n in range(max(1, args.repeat)):
            order = kinds[n % 3 :] + kinds[: n % 3]  # rotate: no side always goes first
            rounds.append({kind: one_round(workdir, paths, kind, concurrency) for kind in order})
    print(f"machine: {_common.machine_note()}, load average {os.getloadavg()[0]:.1f}")
    ok = report(args, total, concurrency, rounds, validate_s)
    return 0 if ok or args.no_target else 1


if __name__ == "__main__":
    sys.exit(main())
