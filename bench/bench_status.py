"""Benchmark: `GET /api/job/{id}/status` under load (SPEC §11: >= 50 % of the requests/s of
a bare FastAPI endpoint returning a constant, same server settings, 2 cores).

Why: web backends poll the status endpoint (seed 003's pattern) from many browsers at
once; what gembatch adds per request (a ledger read, the job rebuilt, the status object
and its response model) must not cost more than the framework itself. The bound is
measured in the same run: a FastAPI app whose one route, at the same path, returns the
same JSON as a constant, served by the same `gembatch.server.run.serve` (the same uvicorn
settings: one process, uvloop, httptools). Both are driven by the same minimal keep-alive
load generator (`_common.hammer`) from this process, alternately, several rounds.

    python bench/bench_status.py [--clients 64] [--seconds 5] [--repeat 3]

Exit status 1 when the target is missed (never with --no-target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import _common
import httpx

from gembatch.server.run import READY_PREFIX

TARGET_RATIO = 0.5


def emulator_config() -> dict[str, Any]:
    # The job's batch stays PENDING: the service's worker has nothing to do meanwhile.
    return {"clock": {"pending_seconds": 3600}}


# -- the bare server ------------------------------------------------------------------------


def serve_bare(body_path: Path) -> None:
    """A FastAPI app with one route that returns a constant (in its own process)."""
    from fastapi import FastAPI

    from gembatch.server.run import serve

    body = json.loads(body_path.read_text())
    app = FastAPI()

    @app.get("/api/job/{job_id}/status")
    async def status(job_id: str):  # no return annotation: no response model
        return body

    serve(app, "127.0.0.1", 0)


class BareServer:
    def __init__(self, body_path: Path, env: dict[str, str]) -> None:
        cmd = [sys.executable, __file__, "--bare-server", str(body_path)]
        environment = {**os.environ, **env}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=environment)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.base_url = line[len(READY_PREFIX) :].strip()
                break
        else:
            raise RuntimeError("the bare server exited before it was ready")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- measurement ----------------------------------------------------------------------------


def measure(base_url: str, pid: int, path: str, clients: int, seconds: float) -> dict[str, Any]:
    request = [("GET", path, b"")]
    asyncio.run(_common.hammer(base_url, request, clients=clients, seconds=min(0.5, seconds)))
    cpu = _common.process_cpu(pid)
    result = asyncio.run(_common.hammer(base_url, request, clients=clients, seconds=seconds))
    cpu = _common.process_cpu(pid) - cpu
    if result.errors:
        raise RuntimeError(f"{result.errors} of {result.requests} requests to {base_url} failed")
    return {
        "rate": result.rate,
        "requests": result.requests,
        "cpu_per_request": cpu / max(1, result.requests),
    }


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], size: int) -> bool:
    g = statistics.median(r["gembatch"]["rate"] for r in rounds)
    b = statistics.median(r["bare"]["rate"] for r in rounds)
    g_cpu = statistics.median(r["gembatch"]["cpu_per_request"] for r in rounds)
    b_cpu = statistics.median(r["bare"]["cpu_per_request"] for r in rounds)
    ratios = [r["gembatch"]["rate"] / r["bare"]["rate"] for r in rounds]
    ratio = g / b
    ok = ratio >= TARGET_RATIO
    print(
        f"service status: GET /api/job/{{id}}/status, {args.clients} keep-alive clients, "
        f"{args.seconds:g} s per run, {len(rounds)} rounds alternating, {size} bytes per answer"
    )
    print(f"  gembatch serve: {g:,.0f} req/s (median; server CPU {g_cpu * 1e3:.2f} ms per request)")
    print(
        f"  bound: bare FastAPI route returning the same JSON as a constant, same uvicorn "
        f"settings: {b:,.0f} req/s (server CPU {b_cpu * 1e3:.2f} ms per request)"
    )
    print(
        f"  ratio {ratio:.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)}; by CPU per "
        f"request {b_cpu / g_cpu:.2f}); target >= {TARGET_RATIO}: {'ok' if ok else 'MISSED'}"
    )
    print(
        "  rounds (gembatch / bare req/s): "
        + ", ".join(f"{r['gembatch']['rate']:,.0f}/{r['bare']['rate']:,.0f}" for r in rounds)
    )
    return ok


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-server":
        serve_bare(Path(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--no-target", action="store_true", help="always exit 0 (smoke tests)")
    args = parser.parse_args()
    _common.raise_open_files_limit(4 * args.clients + 256)

    with tempfile.TemporaryDirectory(prefix="gembatch-bench-status-") as tmp:
        workdir = Path(tmp)
        emulator = _common.start_emulator(emulator_config(), state_dir=workdir / "emulator")
        service = bare = None
        try:
            service = _common.start_service(
                workdir / "service", emulator, ["--poll-interval", "60"]
            )
            job_id = _common.create_service_job(service.base_url, 10)
            path = f"/api/job/{job_id}/status"
            body = httpx.get(service.base_url + path, timeout=30)
            body.raise_for_status()
            body_path = workdir / "status.json"
            body_path.write_bytes(body.content)
            bare = BareServer(body_path, {})
            assert service.proc is not None
            servers = {
                "gembatch": (service.base_url, service.proc.pid),
                "bare": (bare.base_url, bare.proc.pid),
            }
            rounds = []
            for n in range(max(1, args.repeat)):
                order = ("bare", "gembatch") if n % 2 == 0 else ("gembatch", "bare")
                rounds.append(
                    {
                        kind: measure(*servers[kind], path, args.clients, args.seconds)
                        for kind in order
                    }
                )
        finally:
            if bare is not None:
                bare.close()
            if service is not None:
                service.stop()
            emulator.close()
    print(f"machine: {_common.machine_note()}, load average {os.getloadavg()[0]:.1f}")
    ok = report(args, rounds, len(body.content))
    return 0 if ok or args.no_target else 1


if __name__ == "__main__":
    sys.exit(main())
