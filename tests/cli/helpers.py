"""Running the real `gembatch` command against an emulator process, for the CLI tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gembatch.emulator.process import EmulatorProcess

# create_request_timeout: a create cut off without an answer may land for this long (120 s
# against Gemini); the emulator's creates take milliseconds.
FAST_ENGINE = json.dumps(
    {
        "download_retry_interval": 0.2,
        "poll_retry_interval": 0.2,
        "max_download_attempts": 3,
        "create_request_timeout": 3.0,
    }
)


def gembatch(
    emulator: EmulatorProcess | None,
    cwd: Path,
    *args: str,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `gembatch ARGS` in `cwd`, pointed at `emulator`; output captured."""
    environment = {**os.environ, "GEMBATCH_ENGINE": FAST_ENGINE, "COLUMNS": "160"}
    environment.pop("GEMINI_API_KEY", None)
    environment.pop("GOOGLE_API_KEY", None)
    if emulator is not None:
        environment.update(emulator.client_env())
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gembatch", *args],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,  # never a terminal: confirmations must be refused
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(emulator: EmulatorProcess, cwd: Path, *args: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "GEMBATCH_ENGINE": FAST_ENGINE, **emulator.client_env()}
    return subprocess.Popen(
        [sys.executable, "-m", "gembatch", *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ledger(cwd: Path, name: str = "job-info.jsonl") -> list[dict[str, Any]]:
    """Every line of the ledger, parsed (fails if any line does not parse)."""
    path = cwd / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request_file(path: Path, n: int, prefix: str = "k", text: str = "question") -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            line = {
                "key": f"{prefix}{i}",
                "request": {"contents": [{"parts": [{"text": f"{text} {i}"}]}]},
            }
            handle.write(json.dumps(line) + "\n")
    return path


def keys_of(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


def results_of(path: Path) -> dict[str, dict[str, Any]]:
    """The results file beside an input, by key (asserts one line per key)."""
    result = path.parent / "results" / path.name
    lines = [json.loads(line) for line in result.read_text().splitlines()]
    by_key = {line["key"]: line for line in lines}
    assert len(by_key) == len(lines), "a key appears twice in the results"
    return by_key


class ActiveSampler:
    """Samples the emulator's count of unfinished batches while a command runs."""

    def __init__(self, emulator: EmulatorProcess) -> None:
        self.emulator = emulator
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                active = self.emulator.stats()["batches"].get("ACTIVE", 0)
                self.peak = max(self.peak, active)
            except Exception:
                pass
            time.sleep(0.02)

    def __enter__(self) -> ActiveSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Background:
    """`gembatch ARGS` running in the background, its output lines collected as they come."""

    def __init__(self, emulator: EmulatorProcess, cwd: Path, *args: str, **env: str) -> None:
        environment = {**os.environ, "GEMBATCH_ENGINE": FAST_ENGINE, **emulator.client_env()}
        environment.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gembatch", *args],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def errors(self) -> list[str]:
        return [line for line in self.lines if " error: " in line]

    def stopped(self) -> bool:
        """Stopped by SIGSTOP (state T in /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "T"

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()
