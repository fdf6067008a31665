"""`gembatch submit` and `gembatch run`: many request files at once (seed 001)."""

from __future__ import annotations

import sys

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings
from gembatch.errors import UserError

FILES = typer.Argument(..., metavar="FILE", help="JSONL request files.")
MODEL = typer.Option(
    None, "-m", "--model", help="Model (default gemini-2.5-flash-lite, or $GEMBATCH_MODEL)."
)
DRY_RUN = typer.Option(
    False, "--dry-run", help="Validate and show what would be submitted; upload nothing."
)
FORCE = typer.Option(
    False, "--force", help="Submit even if the same file or content was submitted before."
)
PRIORITY = typer.Option(0, "--priority", help="Higher runs first (FIFO within a priority).")
MAX_TASK_BYTES = typer.Option(
    None, "--max-task-bytes", help="Split inputs larger than this into several batches."
)
MAX_TASK_REQUESTS = typer.Option(
    None, "--max-task-requests", help="Split inputs with more requests than this."
)
MAX_PARALLEL = typer.Option(
    None, "--max-parallel-tasks", help="At most this many of a job's batches live at once."
)
MAX_ATTEMPTS = typer.Option(
    3,
    "--max-attempts",
    help="Tries per batch (retryable errors, and EXPIRED with --retry-on EXPIRED).",
)
RETRY_ON = typer.Option(
    None,
    "--retry-on",
    help="Error class to retry (repeatable); default RATE_LIMITED, SERVER_ERROR, NETWORK, TIMEOUT.",
)
RETRY_FAILED = typer.Option(
    False,
    "--retry-failed-requests",
    help="Resubmit requests that failed inside a succeeded batch automatically.",
)
RETRY_INTERVAL = typer.Option(
    30.0, "--retry-interval", help="Seconds before the first retry; doubled each time."
)
MAX_LIVE = typer.Option(
    10, "--max-live-batches", help="Remote batches pending or running at once (Gemini allows 100)."
)


def submit_options(
    model: str | None,
    dry_run: bool,
    force: bool,
    priority: int,
    max_task_bytes: int | None,
    max_task_requests: int | None,
    max_parallel_tasks: int | None,
    max_attempts: int,
    retry_on: list[str] | None,
    retry_failed_requests: bool,
    retry_interval: float = 30.0,
):
    from gembatch.cli.flow import SubmitOptions
    from gembatch.jobs import RetryConfig

    config = {
        "max_attempts": max_attempts,
        "retry_failed_requests": retry_failed_requests,
        "retry_interval": retry_interval,
    }
    if retry_on:
        config["retry_on_errors"] = retry_on
    try:
        retry_config = RetryConfig.from_dict(config)
    except ValueError as exc:
        raise UserError(str(exc).replace("retry_config.", "--")) from None
    for name, value in (
        ("--max-task-bytes", max_task_bytes),
        ("--max-task-requests", max_task_requests),
        ("--max-parallel-tasks", max_parallel_tasks),
    ):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1")
    return SubmitOptions(
        model=common.model_name(model),
        priority=priority,
        force=force,
        dry_run=dry_run,
        max_task_bytes=max_task_bytes,
        max_task_requests=max_task_requests,
        max_parallel_tasks=max_parallel_tasks,
        retry_config=retry_config,
    )


@app.command()
def submit(
    ctx: typer.Context,
    files: list[str] = FILES,
    model: str | None = MODEL,
    dry_run: bool = DRY_RUN,
    force: bool = FORCE,
    priority: int = PRIORITY,
    max_task_bytes: int | None = MAX_TASK_BYTES,
    max_task_requests: int | None = MAX_TASK_REQUESTS,
    max_parallel_tasks: int | None = MAX_PARALLEL,
    max_attempts: int = MAX_ATTEMPTS,
    retry_on: list[str] | None = RETRY_ON,
    retry_failed_requests: bool = RETRY_FAILED,
    retry_interval: float = RETRY_INTERVAL,
    max_live_batches: int = MAX_LIVE,
) -> None:
    """Validate, upload and submit request files; skip ones already submitted."""
    options = submit_options(
        model,
        dry_run,
        force,
        priority,
        max_task_bytes,
        max_task_requests,
        max_parallel_tasks,
        max_attempts,
        retry_on,
        retry_failed_requests,
        retry_interval,
    )
    code = _submit(ctx, files, options, max_live_batches)
    raise typer.Exit(code)


def _submit(ctx: typer.Context, files: list[str], options, max_live_batches: int) -> int:
    from gembatch.cli import flow

    opts = settings(ctx)
    if options.dry_run:
        flow.print_dry_run(flow.validate(files, options), sys.stdout)
        return 0
    with common.local_emulator(opts):
        remote = common.make_remote()  # the key is checked before any work
        inputs = flow.validate(files, options)
        engine = flow.engine_for(
            common.ledger_for(ctx),
            remote,
            flow.PollOptions(max_live_batches=max_live_batches),
            role="submit",
        )

        async def go() -> int:
            try:
                return await flow.submit(engine, inputs, options, sys.stdout)
            finally:
                await remote.aclose()

        failures = common.run(go())
    return 1 if failures else 0


@app.command()
def run(
    ctx: typer.Context,
    files: list[str] = FILES,
    model: str | None = MODEL,
    force: bool = FORCE,
    priority: int = PRIORITY,
    max_task_bytes: int | None = MAX_TASK_BYTES,
    max_task_requests: int | None = MAX_TASK_REQUESTS,
    max_parallel_tasks: int | None = MAX_PARALLEL,
    max_attempts: int = MAX_ATTEMPTS,
    retry_on: list[str] | None = RETRY_ON,
    retry_failed_requests: bool = RETRY_FAILED,
    retry_interval: float = RETRY_INTERVAL,
    max_live_batches: int = MAX_LIVE,
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls."),
) -> None:
    """Submit request files, then poll until every job is finished."""
    from gembatch.cli import flow

    options = submit_options(
        model,
        False,
        force,
        priority,
        max_task_bytes,
        max_task_requests,
        max_parallel_tasks,
        max_attempts,
        retry_on,
        retry_failed_requests,
        retry_interval,
    )
    opts = settings(ctx)
    with common.local_emulator(opts):
        remote = common.make_remote()
        inputs = flow.validate(files, options)
        poll_options = flow.PollOptions(interval=interval, max_live_batches=max_live_batches)
        lock = flow.exclusive_poll_lock(opts.job_info)
        engine = flow.engine_for(common.ledger_for(ctx), remote, poll_options, role="run")

        async def go() -> int:
            try:
                failures = await flow.submit(engine, inputs, options, sys.stdout)
                code = await flow.poll(engine, poll_options, sys.stdout)
                return 1 if failures else code
            finally:
                await remote.aclose()

        try:
            code = common.run(go())
        finally:
            lock.release()
    raise typer.Exit(code)
