"""`gembatch cancel` and `gembatch retry`."""

from __future__ import annotations

import sys

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings
from gembatch.errors import UserError


@app.command()
def cancel(
    ctx: typer.Context,
    job: str = typer.Argument(..., metavar="JOB|FILE", help="A job id, or its request file."),
) -> None:
    """Cancel a job: its remote batches are cancelled; results already made are kept.

    If Gemini cannot be reached, the job stays cancelling and the next `gembatch poll`
    sends the cancel again; poll also collects what already finished.
    """
    from gembatch.jobs import InvalidTransition

    opts = settings(ctx)
    common.check_ledger_path(opts.job_info)
    with common.local_emulator(opts):
        remote = common.make_remote()
        engine = _engine(ctx, remote, "cancel")
        target = common.find_job(engine.jobs(), job)

        from gembatch.engine.engine import CycleReport

        report = CycleReport()

        async def go():
            try:
                return await engine.cancel(target.id, report)
            finally:
                await remote.aclose()

        try:
            result = common.run(go())
        except InvalidTransition:
            raise UserError(
                f"job {target.id} ({target.input_file}) is {target.status.value}: "
                "only pending or running jobs can be cancelled"
            ) from None
    for _, message in report.errors:
        print(
            f"warning: {message}; the job stays cancelling and `gembatch poll` sends the "
            "cancel again",
            file=sys.stderr,
        )
    if result.status.terminal:
        print(f"{result.id} {result.input_file}: {result.status.value}")
    else:
        print(
            f"{result.id} {result.input_file}: cancelling; `gembatch poll` collects what "
            "already finished and ends the job when Gemini confirms"
        )


@app.command()
def retry(
    ctx: typer.Context,
    job: str | None = typer.Argument(
        None,
        metavar="JOB|FILE",
        help="A job id, or its request file (default: every job with something to retry).",
    ),
) -> None:
    """Resubmit failed or expired jobs, and requests that failed inside a finished batch.

    Only what failed gets a new batch; the job's results file then holds one line per key.
    `gembatch poll` collects the new results.
    """
    from gembatch.jobs import InvalidTransition, JobStatus, TaskState

    opts = settings(ctx)
    common.check_ledger_path(opts.job_info)
    with common.local_emulator(opts):
        remote = common.make_remote()
        engine = _engine(ctx, remote, "retry")
        jobs = engine.jobs()
        if job is not None:
            targets = [common.find_job(jobs, job)]
        else:
            targets = [
                j
                for j in jobs
                if j.status is JobStatus.FAILED
                or (j.status is JobStatus.COMPLETED and j.requests.failed)
            ]
            if not targets:
                print("nothing to retry: no failed jobs and no failed requests")
                return

        async def go() -> int:
            problems = 0
            try:
                retried = []
                for target in targets:
                    try:
                        updated = await engine.retry(target.id)
                        retried.append(updated.id)
                        before = {t.index for t in target.tasks}
                        added = [t for t in updated.tasks if t.index not in before]
                        new = [t for t in added if t.state is TaskState.NEW]
                        again = [t for t in added if t.state is TaskState.SUCCEEDED]
                        label = f"{target.id} {target.input_file}"
                        if new:
                            count = sum(t.input.count for t in new)
                            print(f"{label}: retrying {count} request(s)")
                        for task in again:
                            print(
                                f"{label}: downloading the results of {task.batch_name} "
                                "again (they are still on Gemini: no new batch, nothing "
                                "paid twice)"
                            )
                    except InvalidTransition as exc:
                        problems += 1
                        print(
                            f"{target.id} {target.input_file}: not retried: {exc}", file=sys.stderr
                        )
                for outcome in await engine.start(job_ids=set(retried)):
                    if not outcome.ok:
                        problems += 1
                        print(f"{outcome.input_file}: error: {outcome.message}", file=sys.stderr)
                    else:
                        print(f"{outcome.input_file}: {outcome.message}")
            finally:
                await remote.aclose()
            return problems

        problems = common.run(go())
    print("run `gembatch poll` to collect the results")
    raise typer.Exit(1 if problems else 0)


def _engine(ctx: typer.Context, remote, role: str):
    from gembatch.engine.engine import Engine

    return Engine(common.ledger_for(ctx), remote, role=role)
