"""Helpers for the service reliability tests: services that can be killed and restarted,
webhook receivers, live-batch samplers, and reads of the service's own ledger.

Why: those tests drive real `gembatch serve` processes against real emulator processes
and judge only outcomes (job statuses, what the emulator counted, what a receiver got);
the plumbing to start, watch and inspect them lives here so each test reads as its story.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess

TERMINAL = ("completed", "failed", "cancelled")
SERVICE_ARGS = ("--poll-interval", "0.2")
# Retries of downloads and polls come back quickly: a test waits seconds, not minutes.
# create_request_timeout: see tests/cli/helpers.py.
FAST_ENGINE = json.dumps(
    {"download_retry_interval": 0.2, "poll_retry_interval": 0.2, "create_request_timeout": 3.0}
)


# -- services -------------------------------------------------------------------------------


class Services:
    """Starts `gembatch serve` processes on emulators; stops whatever still runs at `close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServiceProcess] = []

    def __call__(
        self,
        emu: EmulatorProcess,
        *args: str,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        db_url: str | None = None,
    ) -> ServiceProcess:
        workdir = self.root / (name or f"service-{len(self.started)}")
        environment = {**emu.client_env(), "GEMBATCH_ENGINE": FAST_ENGINE, **(env or {})}
        svc = ServiceProcess(workdir, env=environment, args=[*SERVICE_ARGS, *args], db_url=db_url)
        self.started.append(svc)
        return svc.start()

    def close(self) -> None:
        for svc in self.started:
            svc.stop()


# -- jobs -----------------------------------------------------------------------------------


def inline_body(count: int = 1, text: str = "question", **options: Any) -> dict[str, Any]:
    """A create body with `count` inline requests (keys k1..kN)."""
    items = [
        {"key": f"k{n}", "request": {"contents": [{"parts": [{"text": f"{text} {n}"}]}]}}
        for n in range(1, count + 1)
    ]
    return {"requests": items, **options}


def write_input(path: Path, count: int, text: str = "question") -> Path:
    """A JSONL request file (for `input_file` jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = inline_body(count, text)["requests"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def create_job(client: httpx.Client, body: Mapping[str, Any]) -> str:
    response = client.post("/api/job/batch", json=dict(body))
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def status_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/job/{job_id}/status")
    assert response.status_code == 200, response.text
    return dict(response.json())


def eventually(
    probe: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or probe} (last: {value!r})")
        time.sleep(interval)


def wait_all(
    svc: ServiceProcess,
    job_ids: Iterable[str],
    statuses: Sequence[str] = TERMINAL,
    timeout: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """Every job's status once each is in `statuses` (one shared deadline)."""
    wanted = set(statuses)
    ids = list(job_ids)
    last: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with svc.client() as client:
        while True:
            for job_id in ids:
                if last.get(job_id, {}).get("status") not in wanted:
                    last[job_id] = status_of(client, job_id)
            waiting = {j: s["status"] for j, s in last.items() if s["status"] not in wanted}
            if not waiting:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not in {sorted(wanted)} after {timeout} s: {waiting}")
            time.sleep(0.1)


# -- what the emulator and the ledger saw ---------------------------------------------------


def creates_of(emu: EmulatorProcess, job_id: str) -> dict[str, int]:
    """Batches created for one job, by display name (display names carry the job id)."""
    creates = emu.stats()["creates_by_display_name"]
    return {name: n for name, n in creates.items() if f"-{job_id}-" in name}


def ledger_records(db_url: str, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The service's own records of these jobs (tasks, batches), read from its database."""
    from gembatch.ledger.sql import SqlLedger

    with SqlLedger(db_url) as ledger:
        records = {job_id: ledger.get(job_id) for job_id in job_ids}
    missing = [job_id for job_id, record in records.items() if record is None]
    assert not missing, f"jobs missing from {db_url}: {missing}"
    return records  # type: ignore[return-value]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in /metrics"
    return float(found[1])


class LiveBatchSampler:
    """Samples, every `interval` seconds in a thread, how many batches the emulator holds
    unfinished and how many the service counts as live (`/metrics`)."""

    def __init__(self, emu: EmulatorProcess, svc: ServiceProcess, interval: float = 0.05) -> None:
        self.emu = emu
        self.svc = svc
        self.interval = interval
        self.remote: list[int] = []
        self.service: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LiveBatchSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with self.svc.client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    self.remote.append(int(self.emu.stats()["batches"].get("ACTIVE", 0)))
                    text = client.get("/metrics").text
                    self.service.append(metric(text, "gembatch_live_batches"))
                except Exception as exc:  # a slow sample is not a failure of the service
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.interval)


# -- webhooks -------------------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 in a thread that records every POST (path, headers,
    JSON body, the status it answered). Paths in `down` answer 500."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.down: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver._lock:
                    status = 500 if self.path in receiver.down else 200
                    receiver.posts.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": json.loads(raw or b"null"),
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def received(self, path: str | None = None, ok_only: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            return [
                p
                for p in self.posts
                if (path is None or p["path"] == path) and (not ok_only or p["status"] == 200)
            ]

    def by_job(self, path: str, ok_only: bool = False) -> dict[str, list[dict[str, Any]]]:
        jobs: dict[str, list[dict[str, Any]]] = {}
        for post in self.received(path, ok_only):
            jobs.setdefault(post["body"]["job"]["job_id"], []).append(post)
        return jobs


# -- the CLI ----------------------------------------------------------------------------------


def gembatch(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `gembatch ARGS` as its own process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "gembatch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
