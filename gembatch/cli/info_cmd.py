"""`gembatch info LEDGER`: print a job ledger as JSONL, converting legacy records.

Why: seed 002's `batch_info.py job-info.jsonl` showed (and migrated) what the original
tool recorded. This keeps that command line, never writes the ledger, and reports each
line it cannot use (`LEDGER:LINE: what; what to do`) instead of dropping it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gembatch.cli.app import app, settings
from gembatch.cli.common import ProblemReport
from gembatch.errors import UserError
from gembatch.ledger import LedgerProblem
from gembatch.ledger.jsonl import AtomicJobManager, JsonlLedger, dumps_record, is_legacy_record


@app.command()
def info(
    ctx: typer.Context,
    ledger: Path | None = typer.Argument(
        None,
        metavar="LEDGER",
        help="The ledger file to read (default: the --job-info path).",
        show_default=False,
        readable=False,  # `_check_readable` says what is wrong and what to do
    ),
    lock_timeout: float = typer.Option(
        30.0,
        "--lock-timeout",
        metavar="SECONDS",
        help="How long to wait while another command holds the ledger.",
    ),
) -> None:
    """Print every job of a ledger as one JSON object per line; never writes the ledger.

    The original gembatch's `batch_info` command, for ledgers it or gembatch wrote.
    Records in its current format are printed as they are ("count" is added when
    missing). Records of its first version (v0.1.0: job_name, no batch object) are
    converted to the current format, which asks the Gemini API (GEMINI_API_KEY); with
    --local they are converted from the record alone. Problems go to stderr as
    LEDGER:LINE: ...; the exit code is then 1.
    """
    options = settings(ctx)
    path = ledger if ledger is not None else options.job_info
    _check_readable(path)

    client = None
    if not options.local and _needs_api(path, lock_timeout):
        from gembatch.gemini.client import api_key_from_env, make_client

        # Without a key each legacy record is reported with what to do; the rest still print.
        if api_key_from_env():
            client = make_client()

    with AtomicJobManager(
        path,
        client=client,
        timeout=lock_timeout,
        retry_interval=0.05,
        read_only=True,
        offline=options.local,
    ) as manager:
        jobs = manager.get_all_jobs()
        problems = manager.problems
        derived_ids = manager.derived_ids

    _print_jobs(jobs, derived_ids)
    _print_problems(path, problems)
    if problems:
        raise typer.Exit(1)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(
            f"{path}: no such ledger file; give the path of a job-info.jsonl "
            "(written by `gembatch submit`)"
        )
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a ledger file; give a job-info.jsonl path")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot read {path}: {exc.strerror or exc}; check its permissions"
        ) from None


def _needs_api(path: Path, lock_timeout: float) -> bool:
    # A cheap first look, so that the SDK is imported (and a key needed) only for legacy records.
    snapshot = JsonlLedger(path, timeout=lock_timeout).load()
    return any(is_legacy_record(record) for record in snapshot.records)


def _print_jobs(jobs: list[dict], derived_ids: frozenset[str]) -> None:
    out = sys.stdout.buffer  # `gembatch info | head`: see gembatch/cli/pipes.py
    for job in jobs:
        if job.get("id") in derived_ids:  # an id gembatch made up is not in the file
            del job["id"]
        out.write(dumps_record(job) + b"\n")
    out.flush()


def _print_problems(path: Path, problems: list[LedgerProblem]) -> None:
    ProblemReport(path).report(problems)  # as every command reports them
