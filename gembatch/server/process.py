"""A `gembatch serve` process, for tests and benchmarks: start, kill -9, start again.

Why: the service's promises (every job finishes after a crash, one remote batch per task)
only mean something for a real process that can be killed at any instant and restarted
on the same database; this wraps that, like `EmulatorProcess` does for the emulator.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gembatch import processes
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
        self.proc, url = processes.start_announced(
            cmd,
            READY_PREFIX,
            self.log_path,
            what="gembatch serve",
            env=self.env,
            cwd=self.workdir,
            timeout=timeout,
        )
        self.port = processes.port_of(url)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        processes.stop(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        processes.kill(self.proc)

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
