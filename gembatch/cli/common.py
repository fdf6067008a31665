"""What every command needs: the ledger, `--local`, the remote client, finding a job.

Why: each command module stays a few lines that call the engine; the plumbing (an
emulator started for `--local`, the API key checked before any work, Ctrl-C turned into
a clean exit) is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer

from gembatch.cli.app import Settings, settings
from gembatch.errors import UserError
from gembatch.jobs import Job
from gembatch.ledger import LedgerProblem, LedgerSnapshot
from gembatch.ledger.jsonl import DEFAULT_TIMEOUT, JsonlLedger

T = TypeVar("T")
LOCAL_STATE_DIR = ".gembatch-emulator"

# Shared by `poll` and `run`: a poll interval of 0 (or less) would call Gemini in a loop.
INTERVAL = typer.Option(
    30.0, "--interval", metavar="SECONDS", min=0.1, help="Time between two checks of the jobs."
)
CLEANUP_WAIT = typer.Option(
    600.0,
    "--cleanup-wait",
    metavar="SECONDS",
    min=0,
    help="Once every job has ended, how long to keep retrying remote deletes that failed "
    "before exiting (the next poll or `gembatch cleanup` goes on with them).",
)


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


# Problems beyond this many are summarised: a binary file would otherwise flood stderr.
MAX_PROBLEMS_SHOWN = 100


class ProblemReport:
    """Writes the ledger lines gembatch cannot use to stderr, as `PATH:LINE: message`, each
    once per process (a poll loads the ledger every cycle), at most MAX_PROBLEMS_SHOWN."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[LedgerProblem] = []
        self._keys: set[tuple[int, str, bytes]] = set()
        self._hidden = 0
        self._mutex = threading.Lock()  # the engine loads from worker threads

    def report(self, problems: list[LedgerProblem]) -> None:
        with self._mutex:
            hidden = 0
            for problem in problems:
                key = (problem.line, problem.message, problem.raw)
                if key in self._keys:
                    continue
                self._keys.add(key)
                self.seen.append(problem)
                if len(self.seen) > MAX_PROBLEMS_SHOWN:
                    hidden += 1
                    continue
                where = f"{self.path}:{problem.line}" if problem.line else f"{self.path}"
                # sys.stderr looked up now: a live table redirects it while it is shown.
                print(f"{where}: {problem.message}", file=sys.stderr)
            if hidden:
                self._hidden += hidden
                print(f"{self.path}: ... and {self._hidden} more problems", file=sys.stderr)


class ReportingLedger(JsonlLedger):
    """The JSONL ledger of a command: every load reports the lines it cannot use on
    stderr (see ProblemReport) and hands the rest on without them, so that no view
    prints them a second time (or on stdout). `problem_report.seen`: all found so far."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.problem_report = ProblemReport(Path(path))

    def load(self) -> LedgerSnapshot:
        snapshot = super().load()
        if not snapshot.problems:
            return snapshot
        self.problem_report.report(snapshot.problems)
        return dataclasses.replace(snapshot, problems=[])


def ledger_for(ctx: typer.Context) -> Any:
    """The command's ledger (--job-info); lines it cannot use are reported on stderr as
    `PATH:LINE: ...` whenever it is loaded, and the other jobs go on."""
    check_ledger_path(settings(ctx).job_info)

    # $GEMBATCH_LOCK_TIMEOUT: seconds to wait for another process's ledger lock.
    text = os.environ.get("GEMBATCH_LOCK_TIMEOUT")
    try:
        timeout = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise UserError(
            f"GEMBATCH_LOCK_TIMEOUT must be a number of seconds, not {text!r}"
        ) from None
    return ReportingLedger(settings(ctx).job_info, timeout=timeout)


@contextlib.contextmanager
def local_emulator(options: Settings) -> Iterator[str | None]:
    """With `--local`, serve the built-in emulator from this process and point the SDK at
    it. Its state lives beside the ledger, so `submit --local` then `poll --local` work on
    the same batches."""
    if not options.local:
        yield None
        return
    check_ledger_path(options.job_info)
    from gembatch.emulator.server import EmulatorThread

    config = local_config()
    state = options.job_info.resolve().parent / LOCAL_STATE_DIR
    _check_state_dir(state)
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


def _check_state_dir(state: Path) -> None:
    """The emulator's state directory must be writable: say so, not a traceback."""
    try:
        state.mkdir(exist_ok=True)
        writable = os.access(state, os.W_OK | os.X_OK)
    except OSError as exc:
        writable, reason = False, exc.strerror or str(exc)
    else:
        reason = "Permission denied"
    if not writable:
        raise UserError(
            f"--local: cannot write {state} ({reason}): the built-in emulator keeps its "
            "state beside the ledger; check the directory's permissions or give --job-info "
            "a ledger in a directory you can write"
        )


def local_config() -> Any:
    """The built-in emulator's configuration for `--local` ($GEMBATCH_LOCAL_CONFIG)."""
    from gembatch.emulator.config import EmulatorConfig, load_config

    config_path = os.environ.get("GEMBATCH_LOCAL_CONFIG")
    return load_config(config_path) if config_path else EmulatorConfig()


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
