"""A `gembatch serve` process, for tests and benchmarks: start, kill -9, start again.

Why: the service's promises (every job finishes after a crash, one remote batch per task)
only mean something for a real process that can be killed at any instant and restarted
on the same database; this wraps that, like `EmulatorProcess` does for the emulator.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gembatch.server.run import READY_PREFIX


class ServiceProcess:
    def __init__(
        self,
        workdir: str | Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        db_url: str | None = None,
        port: int = 0,
        token: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.db_url = db_url or f"sqlite:///{self.workdir / 'gembatch.db'}"
        self.env = dict(env or {})
        self.args = list(args)
        self.port = port
        self.token = token
        self.log_path = self.workdir / "serve.log"
        self.proc: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        token = token or self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(token), timeout=timeout)

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        cmd = [
            sys.executable, "-m", "gembatch", "serve", "--port", str(self.port),
            "--db", self.db_url, "--data-dir", str(self.data_dir), *self.args,
        ]  # fmt: skip
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        log = open(self.log_path, "a")  # noqa: SIM115 - closed by the reader thread
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                log.close()
                raise RuntimeError(f"gembatch serve exited early; see {self.log_path}")
            log.write(line)
            log.flush()
            if line.startswith(READY_PREFIX):
                self.port = int(line[len(READY_PREFIX) :].strip().rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gembatch serve not ready; see {self.log_path}")
        threading.Thread(target=_drain, args=(self.proc.stdout, log), daemon=True).start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_status(
        self, job_id: str, statuses: Sequence[str], timeout: float = 60.0, token: str | None = None
    ) -> dict[str, Any]:
        """Poll the status endpoint (seed 003's pattern) until the job reaches a status."""
        deadline = time.monotonic() + timeout
        with self.client(token) as client:
            while True:
                body = client.get(f"/api/job/{job_id}/status").json()
                if body.get("status") in statuses:
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {body.get('status')}: {body}")
                time.sleep(0.1)


def _drain(stream: Any, log: Any) -> None:
    try:
        for line in stream:
            log.write(line)
            log.flush()
    finally:
        log.close()
