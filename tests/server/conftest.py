"""Fixtures for tests of `gembatch serve`: real service processes on real emulators.

Why: the service's promises (seed 003's API, SSE resume, per-user isolation, refused
transitions) only mean something for the real process talking to Gemini through the real
SDK. `service_factory` starts an emulator and a `gembatch serve --port 0` pointed at it;
everything it started is stopped at teardown. `module_service_factory` is the same for
services that a whole module shares (property tests, read-mostly tests).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess

# The brief's clock: long enough to see `queued` and `processing` when polling every 0.2 s.
DEFAULT_EMULATOR_CONFIG: dict[str, Any] = {
    "clock": {"pending_seconds": 0.5, "running_seconds": 2.0}
}
FAST_EMULATOR_CONFIG: dict[str, Any] = {"clock": {"pending_seconds": 0.2, "running_seconds": 0.5}}
# Poll the emulator often and ping SSE clients every second; tests' args come after these
# (the last occurrence of an option wins).
DEFAULT_SERVICE_ARGS = ("--poll-interval", "0.2", "--ping-interval", "1")
TERMINAL = ("completed", "failed", "cancelled")


class ServiceLauncher:
    """Starts emulators and services under one directory and stops them all at `close`.

    `launcher(emulator_config=..., args=..., tokens=..., emulator=...)` returns a started
    ServiceProcess with `svc.emulator` (its EmulatorProcess) and `svc.tokens` (user ->
    token; empty in single-user mode). `tokens` is a mapping user -> token (tokens of at
    least 16 characters) or an iterable of user names (tokens are generated). Give
    `emulator` to put a second service on an emulator already started (then
    `emulator_config` must be None), and `db_url` to put it on a database of the test's
    (several services may share one PostgreSQL database; default: its own SQLite file).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.emulators: list[EmulatorProcess] = []
        self.services: list[ServiceProcess] = []

    def emulator(self, config: Mapping[str, Any] | None = None) -> EmulatorProcess:
        state = self.root / f"emulator-{len(self.emulators)}"
        conf = dict(DEFAULT_EMULATOR_CONFIG if config is None else config)
        emu = EmulatorProcess(state_dir=state, config=conf)
        self.emulators.append(emu)
        return emu.start()

    def __call__(
        self,
        emulator_config: Mapping[str, Any] | None = None,
        args: Iterable[str] = (),
        tokens: Mapping[str, str] | Iterable[str] | None = None,
        emulator: EmulatorProcess | None = None,
        env: Mapping[str, str] | None = None,
        db_url: str | None = None,
    ) -> ServiceProcess:
        if emulator is not None and emulator_config is not None:
            raise ValueError("give emulator_config or emulator, not both")
        emu = emulator or self.emulator(emulator_config)
        workdir = self.root / f"service-{len(self.services)}"
        workdir.mkdir(parents=True, exist_ok=True)
        users = _tokens(tokens)
        extra = list(args)
        if users:
            path = workdir / "tokens.txt"
            path.write_text("".join(f"{token} {user}\n" for user, token in users.items()))
            extra = ["--tokens", str(path), *extra]
        svc = ServiceProcess(
            workdir,
            env={**emu.client_env(), **(env or {})},
            args=[*DEFAULT_SERVICE_ARGS, *extra],
            db_url=db_url,
        )
        svc.emulator = emu  # type: ignore[attr-defined]
        svc.tokens = users  # type: ignore[attr-defined]
        self.services.append(svc)
        return svc.start()

    def close(self) -> None:
        for svc in self.services:
            svc.stop()
        for emu in self.emulators:
            emu.close()


def _tokens(tokens: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    if tokens is None:
        return {}
    if isinstance(tokens, Mapping):
        return dict(tokens)
    return {user: f"{user}-{secrets.token_hex(12)}" for user in tokens}


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[ServiceLauncher]:
    """`service_factory(emulator_config=..., args=..., tokens=...)`: a started service
    (with `svc.emulator`), stopped at the end of the test."""
    launcher = ServiceLauncher(tmp_path / "services")
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_service_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceLauncher]:
    """Like `service_factory`, for services shared by every test of a module."""
    launcher = ServiceLauncher(tmp_path_factory.mktemp("module-services"))
    yield launcher
    launcher.close()


# -- request bodies and waits -----------------------------------------------------------------


def request_item(key: str, text: str = "hello") -> dict[str, Any]:
    """One line of a batch file: `{"key", "request": GenerateContentRequest}`."""
    return {"key": key, "request": {"contents": [{"parts": [{"text": text}]}]}}


def inline_body(count: int, prefix: str = "k", failing: Iterable[int] = (), **options: Any) -> dict:
    """A create body with `count` inline requests; those numbered in `failing` (1-based)
    ask the emulator for an error line (the batch still succeeds)."""
    bad = set(failing)
    items = [
        request_item(f"{prefix}{n}", f"prompt {n}" + (" [[emulator:error]]" if n in bad else ""))
        for n in range(1, count + 1)
    ]
    return {"requests": items, **options}


def jsonl(items: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def create_job(client: httpx.Client, body: Mapping[str, Any]) -> str:
    response = client.post("/api/job/batch", json=dict(body))
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def eventually(
    probe: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds with the
    last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or probe} (last: {value!r})")
        time.sleep(interval)


def wait_status(
    client: httpx.Client, job_id: str, statuses: Iterable[str], timeout: float = 30.0
) -> dict[str, Any]:
    """Poll `GET /api/job/{id}/status` until the job is in one of `statuses`."""
    wanted = set(statuses)
    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        nonlocal last
        response = client.get(f"/api/job/{job_id}/status")
        assert response.status_code == 200, response.text
        last = response.json()
        return last if last["status"] in wanted else None

    try:
        return eventually(probe, timeout, 0.1, f"job {job_id} in {sorted(wanted)}")
    except AssertionError:
        message = f"job {job_id} not in {sorted(wanted)} after {timeout} s: {last}"
        raise AssertionError(message) from None


def audit_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/job/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["audit"]


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/job/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["events"]
