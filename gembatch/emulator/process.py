"""An emulator in its own process, for tests and benchmarks (and users' own test suites).

Why: reliability claims only mean something against a real server process that can be
killed and restarted on the same port with the same state; this wraps that, plus the
introspection calls (`stats`, `set_config`, `reset`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from gembatch import processes
from gembatch.emulator.server import READY_PREFIX

DEFAULT_TEST_KEY = "emulator-test-key"


class EmulatorProcess(processes.ServerProcess):
    what = "emulator"
    ready_prefix = READY_PREFIX

    def __init__(
        self,
        state_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self._tmp = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gembatch-emulator-")
            state_dir = self._tmp.name
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state_dir / "test-config.json"
        self.config_path.write_text(json.dumps(dict(config or {})))
        self.host = host
        self.api_key = DEFAULT_TEST_KEY
        log = Path(log_path) if log_path else self.state_dir / "emulator.log"
        super().__init__(log, port, env)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gembatch", "emulator",
            "--host", self.host, "--port", str(self.port),
            "--state-dir", str(self.state_dir), "--config", str(self.config_path),
        ]  # fmt: skip

    def restart(self) -> EmulatorProcess:
        """Stop (if running) and start again on the same port with the same state."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.base_url}/_emulator/stats", timeout=10).json()
        return stats

    def set_config(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{self.base_url}/_emulator/config", json=dict(overrides), timeout=10)
        response.raise_for_status()
        config: dict[str, Any] = response.json()
        return config

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_emulator/reset", timeout=30).raise_for_status()

    def client_env(self) -> dict[str, str]:
        """Environment that points gembatch and the google-genai SDK at this emulator."""
        return {"GOOGLE_GEMINI_BASE_URL": self.base_url, "GEMINI_API_KEY": self.api_key}

    def sdk_client(self, api_version: str | None = None) -> Any:
        from google import genai
        from google.genai import types

        return genai.Client(
            api_key=self.api_key,
            http_options=types.HttpOptions(base_url=self.base_url, api_version=api_version),
        )
