"""`gembatch poll`: watch every job, download and clean up as they finish (seed 000)."""

from __future__ import annotations

import sys

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings


@app.command()
def poll(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Check every job once, then exit."),
    interval: float = common.INTERVAL,
    cleanup_wait: float = common.CLEANUP_WAIT,
    concurrency: int = typer.Option(
        32, "--concurrency", metavar="N", min=1, help="Batches checked at the same time."
    ),
    max_live_batches: int = typer.Option(
        10,
        "--max-live-batches",
        metavar="N",
        min=0,
        help="Remote batches pending or running at once, all jobs together (Gemini allows 100).",
    ),
) -> None:
    """Poll every unfinished job; download, verify and clean up as they finish.

    Submits queued jobs as slots free up. Shows a live table on a terminal, one line per
    event otherwise. Exits when every job is finished (1 if any failed). Ctrl-C stops
    cleanly; running it again resumes where it stopped. One poll per ledger at a time.
    """
    from gembatch.cli import flow

    opts = settings(ctx)
    common.check_ledger_path(opts.job_info)
    with common.local_emulator(opts):
        remote = common.make_remote(concurrency)
        options = flow.PollOptions(
            interval=interval,
            once=once,
            concurrency=concurrency,
            max_live_batches=max_live_batches,
            cleanup_wait=cleanup_wait,
        )
        lock = flow.exclusive_poll_lock(opts.job_info)
        engine = flow.engine_for(common.ledger_for(ctx), remote, options, role="poll")

        async def go() -> int:
            try:
                return await flow.poll(engine, options, sys.stdout)
            finally:
                await remote.aclose()

        try:
            code = common.run(go())
        finally:
            lock.release()
    raise typer.Exit(code)
