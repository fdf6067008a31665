"""Fixtures shared by every test: emulator processes and small input files."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess

FAST_CLOCK = {"clock": {"pending_seconds": 0.2, "running_seconds": 0.6}}


@pytest.fixture
def emulator_factory(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Start emulator processes with a given config; all are stopped at teardown."""
    started: list[EmulatorProcess] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> EmulatorProcess:
        state = tmp_path / f"emulator-{len(started)}"
        emu = EmulatorProcess(state_dir=state, config=config or FAST_CLOCK, **kwargs).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.close()


@pytest.fixture
def emulator(emulator_factory: Callable[..., EmulatorProcess]) -> EmulatorProcess:
    return emulator_factory(FAST_CLOCK)


def write_requests(path: Path, prompts: list[str], prefix: str = "k") -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, prompt in enumerate(prompts, 1):
            line = {"key": f"{prefix}{i}", "request": {"contents": [{"parts": [{"text": prompt}]}]}}
            handle.write(json.dumps(line) + "\n")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# -- PostgreSQL --------------------------------------------------------------------------

# The server the PostgreSQL tests use (CI runs one there); GEMBATCH_TEST_POSTGRES moves it.
POSTGRES_URL = os.environ.get(
    "GEMBATCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_postgres_problem: list[str] = []


def _postgres_reason() -> str | None:
    """None when the test server answers; otherwise why not (asked once per process)."""
    if not _postgres_problem:
        try:
            import psycopg

            url = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _postgres_problem.append("")
        except Exception as exc:  # any reason at all: the tests say it and skip
            _postgres_problem.append(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    return _postgres_problem[0] or None


def postgres_schema_url(schema: str) -> str:
    """The test server's URL with `schema` as the search path: every test gets its own
    schema (faster than a database, and dropped with one statement)."""
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A URL for an empty PostgreSQL schema of this test's own; skips (saying why) when no
    server is reachable, fails instead when GEMBATCH_REQUIRE_POSTGRES=1 (CI)."""
    reason = _postgres_reason()
    if reason:
        if os.environ.get("GEMBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    import psycopg

    schema = f"gbt_{secrets.token_hex(6)}"
    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield postgres_schema_url(schema)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
