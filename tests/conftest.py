"""Fixtures shared by every test: emulator processes and small input files."""

from __future__ import annotations

import json
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
