"""What every command needs: the ledger, `--local`, the remote client, finding a job.

Why: each command module stays a few lines that call the engine; the plumbing (an
emulator started for `--local`, the API key checked before any work, Ctrl-C turned into
a clean exit) is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer

from gembatch.cli.app import Settings, settings
from gembatch.errors import UserError
from gembatch.jobs import Job

T = TypeVar("T")
LOCAL_STATE_DIR = ".gembatch-emulator"

# Shared by `poll` and `run`: a poll interval of 0 (or less) would call Gemini in a loop.
INTERVAL = typer.Option(30.0, "--interval", min=0.1, help="Seconds between polls.")


def check_ledger_path(path: Path) -> None:
    """Refuse a ledger in a directory that does not exist: a typo in --job-info must not
    create directories (or a second ledger) somewhere unexpected."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(
            f"--job-info {path}: {parent} {what}; create it first or give a ledger path "
            "in an existing directory"
        )
    if path.is_dir():
        raise UserError(f"--job-info {path} is a directory; give the path of a JSONL file")


def ledger_for(ctx: typer.Context) -> Any:
    from gembatch.ledger.jsonl import DEFAULT_TIMEOUT, JsonlLedger

    check_ledger_path(settings(ctx).job_info)

    # $GEMBATCH_LOCK_TIMEOUT: seconds to wait for another process's ledger lock.
    text = os.environ.get("GEMBATCH_LOCK_TIMEOUT")
    try:
        timeout = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise UserError(
            f"GEMBATCH_LOCK_TIMEOUT must be a number of seconds, not {text!r}"
        ) from None
    return JsonlLedger(settings(ctx).job_info, timeout=timeout)


@contextlib.contextmanager
def local_emulator(options: Settings) -> Iterator[str | None]:
    """With `--local`, serve the built-in emulator from this process and point the SDK at
    it. Its state lives beside the ledger, so `submit --local` then `poll --local` work on
    the same batches."""
    if not options.local:
        yield None
        return
    check_ledger_path(options.job_info)
    from gembatch.emulator.config import EmulatorConfig, load_config
    from gembatch.emulator.server import EmulatorThread

    config_path = os.environ.get("GEMBATCH_LOCAL_CONFIG")
    config = load_config(config_path) if config_path else EmulatorConfig()
    state = options.job_info.resolve().parent / LOCAL_STATE_DIR
    saved = {k: os.environ.get(k) for k in ("GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY")}
    with EmulatorThread(state, config) as emulator:
        os.environ["GOOGLE_GEMINI_BASE_URL"] = emulator.base_url
        os.environ["GEMINI_API_KEY"] = "local-emulator-key"
        try:
            yield emulator.base_url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def make_remote(concurrency: int = 32) -> Any:
    """The Gemini client, after checking the API key (before any work, seed 001)."""
    from gembatch.gemini.client import BASE_URL_ENV, require_api_key
    from gembatch.gemini.remote import Remote

    key = require_api_key()
    return Remote(key, os.environ.get(BASE_URL_ENV) or None, concurrency=concurrency)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the engine; Ctrl-C cancels in-flight work cleanly (temp files removed, claims
    left for the next run to resume) and exits 130."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: nothing is lost; run the same command again to resume",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None


def find_job(jobs: list[Job], ref: str) -> Job:
    """A job by id, by input file as given, or by the resolved path of its input."""
    for job in jobs:
        if job.id == ref:
            return job
    matches = [j for j in jobs if j.input_file == ref]
    if not matches:
        resolved = str(Path(ref).resolve())
        matches = [
            j
            for j in jobs
            if (j.input_path and j.input_path == resolved)
            or str(Path(j.input_file).resolve()) == resolved
        ]
    if not matches:
        raise UserError(
            f"no job {ref!r} in the ledger: give a job id or an input file "
            "(`gembatch status` lists them)"
        )
    # Several jobs for one file (resubmitted with --force): the latest.
    return matches[-1]


def model_name(option: str | None) -> str:
    from gembatch.cli.app import default_model

    return option or default_model()
