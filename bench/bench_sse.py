"""Benchmark: SSE fan-out, 1,000 clients on one job (SPEC §11: a new event reaches all of
them, p99 <= 250 ms).

Why: a dashboard open in a thousand browsers follows one job through
`GET /api/job/{id}/stream`; each new event must reach every one of them promptly, and the
thousand streams must not cost a thousand database reads per event. The events are real:
one job runs against an emulator batch whose progress moves every second, and the
service's worker polls it every --poll-interval seconds, so each poll writes a `progress`
event. A sample is the time from the event's `updated_at` (the instant the worker changed
the job, just before the event is committed; millisecond precision) to the instant a
client read it off its socket. For reference the same events are first timed with one
client (the pipeline's own delay: commit, the hub's read of the log, one send).

Clients are raw asyncio sockets spread over --processes processes (no HTTP library, no
parsing beyond finding each event's id and `updated_at`), so the load generator is not
the bottleneck; their CPU use is printed.

    python bench/bench_sse.py [--clients 1000] [--events 10] [--processes 4]

Exit status 1 when the target is missed (never with --no-target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _common
import httpx

TARGET_P99_S = 0.250
FINISHED_PER_SECOND = 5  # the emulator's pace: a poll a second always sees progress

_EVENT = re.compile(rb"id: (\d+)\r?\nevent: (\w+)\r?\ndata: ([^\r\n]*)\r?\n\r?\n")
_UPDATED = re.compile(rb'"updated_at": "([^"]+)"')


def emulator_config(requests: int) -> dict[str, Any]:
    running = requests / FINISHED_PER_SECOND
    return {"clock": {"pending_seconds": 0.2, "running_seconds": running}}


# -- the client processes -------------------------------------------------------------------


def _epoch(text: bytes) -> float:
    moment = datetime.strptime(text.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return moment.timestamp()


async def _clients(host: str, port: int, path: str, count: int, events: int) -> dict[str, Any]:
    """`count` SSE connections. Prints `ready` once each has its first event; after `go
    <epoch>` on stdin, records every event written after <epoch> until each connection has
    `events` of them; returns {seq: [latency, ...]}."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    written: dict[int, float] = {}  # seq -> updated_at (parsed once per process)
    samples: dict[int, list[float]] = {}
    go_at = math.inf
    go = asyncio.Event()
    ready = 0
    all_ready = asyncio.Event()

    async def one() -> None:
        nonlocal ready
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        buf = b""
        seen = 0
        first = True
        try:
            while seen < events:
                chunk = await reader.read(65536)
                now = time.time()
                if not chunk:
                    raise RuntimeError("the server closed an SSE stream")
                buf += chunk
                end = 0
                for match in _EVENT.finditer(buf):
                    end = match.end()
                    if first:
                        first = False
                        ready += 1
                        if ready == count:
                            all_ready.set()
                        continue
                    seq = int(match.group(1))
                    if seq not in written:
                        stamp = _UPDATED.search(match.group(3))
                        written[seq] = _epoch(stamp.group(1)) if stamp else math.inf
                    if go.is_set() and written[seq] >= go_at:
                        samples.setdefault(seq, []).append(now - written[seq])
                        seen += 1
                buf = buf[end:]
        finally:
            writer.close()

    async def wait_for_go() -> None:
        nonlocal go_at
        await all_ready.wait()
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        go_at = float(line.split()[1])
        go.set()

    waiter = asyncio.create_task(wait_for_go())
    tasks = []
    for n in range(count):  # connect in waves: a burst of SYNs overflows nothing then
        tasks.append(asyncio.create_task(one()))
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    await waiter
    usage = os.times()
    return {"samples": samples, "cpu": usage.user + usage.system}


def client_main(argv: list[str]) -> int:
    base_url, path, count, events = argv[0], argv[1], int(argv[2]), int(argv[3])
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    _common.raise_open_files_limit(count + 64)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        run = asyncio.run
    result = run(_clients(host, int(port), path, count, events))
    print(json.dumps(result), flush=True)
    return 0


class ClientGroup:
    """`clients` SSE connections spread over `processes` processes."""

    def __init__(self, base_url: str, path: str, clients: int, processes: int, events: int):
        self.procs = []
        share = [clients // processes + (i < clients % processes) for i in range(processes)]
        for count in filter(None, share):
            cmd = [sys.executable, __file__, "--clients-process", base_url, path,
                   str(count), str(events)]  # fmt: skip
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks; the deadline is checked between processes
            if line.strip() != "ready" or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"SSE clients not connected in {timeout:g} s ({line!r})")

    def go(self, at: float) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"go {at}\n")
            proc.stdin.flush()

    def results(self, timeout: float) -> tuple[dict[int, list[float]], float]:
        samples: dict[int, list[float]] = {}
        cpu = 0.0
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError("SSE clients did not receive every event in time") from None
            if proc.returncode != 0:
                raise RuntimeError(f"an SSE client process failed ({proc.returncode})")
            result = json.loads(out.strip().splitlines()[-1])
            cpu += result["cpu"]
            for seq, values in result["samples"].items():
                samples.setdefault(int(seq), []).extend(values)
        return samples, cpu

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- one phase: N clients, E events -----------------------------------------------------------


def phase(
    base_url: str, path: str, clients: int, processes: int, events: int, server_pid: int
) -> dict[str, Any]:
    started = time.perf_counter()
    group = ClientGroup(base_url, path, clients, processes, events)
    try:
        group.wait_ready(timeout=120)
        connected = time.perf_counter() - started
        cpu = _common.process_cpu(server_pid)
        wall = time.perf_counter()
        group.go(time.time())
        samples, client_cpu = group.results(timeout=60 + 10 * events)
        wall = time.perf_counter() - wall
        cpu = _common.process_cpu(server_pid) - cpu
    finally:
        group.kill()
    flat = sorted(v for values in samples.values() for v in values)
    complete = {seq: values for seq, values in samples.items() if len(values) == clients}
    return {
        "clients": clients,
        "connect_s": connected,
        "samples": flat,
        "events": len(complete),
        "per_event_last": [max(complete[seq]) for seq in sorted(complete)],
        "server_cpu": cpu,
        "client_cpu": client_cpu,
        "wall": wall,
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def describe(result: dict[str, Any]) -> str:
    s = result["samples"]
    return (
        f"p50 {_quantile(s, 0.5) * 1e3:.0f} ms, p99 {_quantile(s, 0.99) * 1e3:.0f} ms, "
        f"max {s[-1] * 1e3:.0f} ms over {len(s):,} deliveries ({result['events']} events)"
    )


def report(args: argparse.Namespace, single: dict[str, Any], fan: dict[str, Any]) -> bool:
    p99 = _quantile(fan["samples"], 0.99)
    ok = p99 <= TARGET_P99_S
    print(
        f"SSE fan-out: {args.clients} clients on one job ({args.processes} client processes), "
        f"a progress event every {args.poll_interval:g} s from the worker's polls"
    )
    print(f"  {args.clients} clients: {describe(fan)}")
    print(f"  bound, same run: 1 client: {describe(single)}")
    print(
        f"  p99 {p99 * 1e3:.0f} ms; target <= {TARGET_P99_S * 1e3:.0f} ms: "
        f"{'ok' if ok else 'MISSED'} ({p99 / TARGET_P99_S:.2f} x target; "
        f"{p99 / max(_quantile(single['samples'], 0.99), 1e-9):.1f} x the 1-client p99)"
    )
    last = ", ".join(f"{v * 1e3:.0f}" for v in fan["per_event_last"])
    print(f"  per event (in order), until the last client had it: {last} ms")
    print(
        f"  connecting {args.clients} clients took {fan['connect_s']:.1f} s; during the events "
        f"the server used {fan['server_cpu']:.2f} s CPU ({fan['server_cpu'] / fan['wall']:.0%} "
        f"of a core), the clients {fan['client_cpu']:.2f} s in all (connecting included)"
    )
    return ok


def wait_running(base_url: str, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{base_url}/api/job/{job_id}/status", timeout=30).json()
        if body["status"] == "running" and body["requests"]["succeeded"] > 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} not running after {timeout:g} s: {body}")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--clients-process":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=10, help="events timed per phase")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the worker's (s)")
    parser.add_argument("--requests", type=int, default=20_000, help="the job's (5 finish/s)")
    parser.add_argument("--no-target", action="store_true", help="always exit 0 (smoke tests)")
    args = parser.parse_args()
    _common.raise_open_files_limit(2 * args.clients + 256)

    with tempfile.TemporaryDirectory(prefix="gembatch-bench-sse-") as tmp:
        workdir = Path(tmp)
        emulator = _common.start_emulator(
            emulator_config(args.requests), state_dir=workdir / "emulator"
        )
        service = None
        try:
            service = _common.start_service(
                workdir / "service",
                emulator,
                ["--poll-interval", str(args.poll_interval), "--ping-interval", "3600"],
            )
            assert service.proc is not None
            job_id = _common.create_service_job(service.base_url, args.requests)
            wait_running(service.base_url, job_id)
            path = f"/api/job/{job_id}/stream"
            pid = service.proc.pid
            single = phase(service.base_url, path, 1, 1, args.events, pid)
            fan = phase(service.base_url, path, args.clients, args.processes, args.events, pid)
        finally:
            if service is not None:
                service.stop()
            emulator.close()
    print(f"machine: {_common.machine_note()}, load average {os.getloadavg()[0]:.1f}")
    ok = report(args, single, fan)
    return 0 if ok or args.no_target else 1


if __name__ == "__main__":
    sys.exit(main())
