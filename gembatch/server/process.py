"""A `gembatch serve` process, for tests and benchmarks: start, kill -9, start again.

Why: the service's promises (every job finishes after a crash, one remote batch per task)
only mean something for a real process that can be killed at any instant and restarted
on the same database; this wraps that, like `EmulatorProcess` does for the emulator.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from gembatch import processes
from gembatch.server.run import READY_PREFIX


class ServiceProcess(processes.ServerProcess):
    what = "gembatch serve"
    ready_prefix = READY_PREFIX
    start_timeout = 60.0
    stop_timeout = 15.0

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
        self.args = list(args)
        self.token = token
        super().__init__(self.workdir / "serve.log", port, env, cwd=self.workdir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, token: str | None = None) -> dict[str, str]:
        token = token or self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(token), timeout=timeout)

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gembatch", "serve", "--port", str(self.port),
            "--db", self.db_url, "--data-dir", str(self.data_dir), *self.args,
        ]  # fmt: skip

    def wait_status(
        self, job_id: str, statuses: Sequence[str], timeout: float = 60.0, token: str | None = None
    ) -> dict[str, Any]:
        """Poll the status endpoint (seed 003's pattern) until the job reaches a status."""
        deadline = time.monotonic() + timeout
        with self.client(token) as client:
            while True:
                body: dict[str, Any] = client.get(f"/api/job/{job_id}/status").json()
                if body.get("status") in statuses:
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {body.get('status')}: {body}")
                time.sleep(0.1)
