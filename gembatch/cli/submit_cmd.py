"""`gembatch submit` and `gembatch run`: many request files at once (seed 001)."""

from __future__ import annotations

import asyncio
import sys

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings
from gembatch.errors import UserError

FILES = typer.Argument(
    ...,
    metavar="FILE",
    help='JSONL request files: one {"key": ..., "request": ...} object per line.',
)
MODEL = typer.Option(
    None,
    "-m",
    "--model",
    metavar="MODEL",
    help="Gemini model (default: $GEMBATCH_MODEL, else gemini-2.5-flash-lite).",
)
DRY_RUN = typer.Option(
    False,
    "--dry-run",
    help="Validate and show what would be submitted (requests, bytes, batches); upload nothing.",
)
FORCE = typer.Option(
    False,
    "--force",
    help="Submit even a file (or the same content) submitted before; the new job's "
    "results go to a file of their own.",
)
PRIORITY = typer.Option(
    0,
    "--priority",
    metavar="N",
    help="Higher numbers go first; equal numbers first come, first served.",
)
MAX_TASK_BYTES = typer.Option(
    None,
    "--max-task-bytes",
    metavar="BYTES",
    min=1,
    help="Split a file larger than this into several batches.",
)
MAX_TASK_REQUESTS = typer.Option(
    None,
    "--max-task-requests",
    metavar="N",
    min=1,
    help="Split a file of more requests than this into several batches.",
)
MAX_PARALLEL = typer.Option(
    None,
    "--max-parallel-tasks",
    metavar="N",
    min=1,
    help="At most this many of one job's batches pending or running at once.",
)
MAX_ATTEMPTS = typer.Option(
    3,
    "--max-attempts",
    metavar="N",
    min=1,
    help="Tries per batch when an error is retried (see --retry-on).",
)
RETRY_ON = typer.Option(
    None,
    "--retry-on",
    metavar="CLASS",
    help="Error class to retry, repeatable; replaces the default (RATE_LIMITED, SERVER_ERROR, "
    "NETWORK, TIMEOUT). Also: EXPIRED, BATCH_FAILED.",
)
RETRY_FAILED = typer.Option(
    False,
    "--retry-failed-requests",
    help="Resubmit, as a new batch, the requests that failed inside a batch that succeeded.",
)
RETRY_INTERVAL = typer.Option(
    30.0,
    "--retry-interval",
    metavar="SECONDS",
    min=0.0,
    help="Wait before the first retry; doubled each time.",
)
MAX_LIVE = typer.Option(
    10,
    "--max-live-batches",
    metavar="N",
    min=0,
    help="Remote batches pending or running at once, all jobs together (Gemini allows 100; "
    "0: queue only, `gembatch poll` submits).",
)

# RetryConfig's fields, as the command line spells them (for its error messages).
_RETRY_OPTIONS = {
    "retry_on_errors": "--retry-on",
    "max_attempts": "--max-attempts",
    "retry_interval": "--retry-interval",
    "retry_failed_requests": "--retry-failed-requests",
}


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
    from gembatch.jobs import ErrorClass, RetryConfig

    config = {
        "max_attempts": max_attempts,
        "retry_failed_requests": retry_failed_requests,
        "retry_interval": retry_interval,
    }
    if retry_on:
        known = {e.value for e in ErrorClass}
        for value in retry_on:
            if value.strip().upper() not in known:
                raise UserError(
                    f"--retry-on {value}: unknown error class; use one of "
                    + ", ".join(e.value for e in ErrorClass)
                )
        config["retry_on_errors"] = [v.strip().upper() for v in retry_on]
    try:
        retry_config = RetryConfig.from_dict(config)
    except ValueError as exc:
        message = str(exc)
        for field, option in _RETRY_OPTIONS.items():
            message = message.replace(f"retry_config.{field}", option)
        raise UserError(message) from None
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
    """Validate, upload and submit request files; skip ones already submitted.

    Every file (and the model) is checked before anything is uploaded: each problem is
    named with its file and line. A file submitted before (same path or same content) is
    skipped unless --force. One line per file tells what happened; the exit code is
    non-zero if any file failed. `gembatch poll` then collects the results.
    """
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
        inputs = flow.validate(files, options)
        flow.print_dry_run(inputs, sys.stdout, _dry_run_model_line(opts, options.model))
        return 0
    common.check_ledger_path(opts.job_info)
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
                return (await flow.submit(engine, inputs, options, sys.stdout)).failures
            finally:
                await remote.aclose()

        failures = common.run(go())
    return 1 if failures else 0


def _dry_run_model_line(opts, model: str) -> str:
    """Check the model as submit would, when that needs no setup: the API when a key is
    set, the built-in emulator's own rule with --local (no server, no state written).
    Offline, or without a key, the dry run still works and says the model was not
    checked. An unknown model raises UserError (exit 2), as submit would."""
    from gembatch.cli import flow
    from gembatch.gemini.client import api_key_from_env
    from gembatch.gemini.model_check import ModelCheck, check_model

    if opts.local:
        from gembatch.emulator.models import is_known, model_not_found

        if not is_known(common.local_config(), model):
            error = model_not_found(model, "v1", "getModel")
            raise flow.unknown_model_error(
                ModelCheck(model, False, error.message, f"404 {error.status}")
            )
        return f"model {model}: served by the built-in emulator"
    if not api_key_from_env():
        return f"model {model}: not checked (GEMINI_API_KEY is not set)"
    remote = common.make_remote(concurrency=1)

    async def go() -> ModelCheck:
        try:
            return await check_model(remote, model, attempts=1)  # offline: no waiting
        finally:
            await remote.aclose()

    check = common.run(go())
    if check.known is False:
        raise flow.unknown_model_error(check)
    if check.warning:
        print(f"warning: {check.warning}", file=sys.stderr)
    if check.known:
        return f"model {model}: available"
    return f"model {model}: not checked ({check.code}: {check.message})"


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
    interval: float = common.INTERVAL,
    cleanup_wait: float = common.CLEANUP_WAIT,
) -> None:
    """Submit request files, then poll until every job is finished.

    The options of `submit`, and `poll`'s --interval. The exit code is 1 unless every one
    of these files' jobs completed.
    """
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
    common.check_ledger_path(opts.job_info)
    with common.local_emulator(opts):
        remote = common.make_remote()
        inputs = flow.validate(files, options)
        poll_options = flow.PollOptions(
            interval=interval, max_live_batches=max_live_batches, cleanup_wait=cleanup_wait
        )
        lock = flow.exclusive_poll_lock(opts.job_info)
        engine = flow.engine_for(common.ledger_for(ctx), remote, poll_options, role="run")

        async def go() -> int:
            try:
                submitted = await flow.submit(engine, inputs, options, sys.stdout)
                await flow.poll(engine, poll_options, sys.stdout)
            finally:
                await remote.aclose()
            # The final state of this command's jobs decides, not a 429 retried on the way.
            return await asyncio.to_thread(flow.outcome_code, engine, submitted.job_ids)

        try:
            code = common.run(go())
        finally:
            lock.release()
    raise typer.Exit(code)
