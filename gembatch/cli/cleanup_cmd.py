"""`gembatch cleanup`: delete remote files and batches that finished jobs left behind."""

from __future__ import annotations

import sys
from typing import Any

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings
from gembatch.errors import UserError


@app.command()
def cleanup(
    ctx: typer.Context,
    yes: bool = typer.Option(False, "-y", "--yes", help="Delete without asking first."),
    everything: bool = typer.Option(
        False,
        "--all",
        help="Every file and finished batch in the Gemini project, not only this ledger's "
        "(pending or running batches and the files they use are never deleted).",
    ),
) -> None:
    """Delete the remote inputs, batches and outputs of this ledger's finished jobs.

    Lists what it will delete and asks first (off a terminal, -y is required). Results
    that were never downloaded are kept, with the command that downloads them.
    """
    from gembatch.engine.engine import Engine, cleanup_targets

    opts = settings(ctx)
    common.check_ledger_path(opts.job_info)
    with common.local_emulator(opts):
        remote = common.make_remote()
        engine = Engine(common.ledger_for(ctx), remote, role="cleanup")
        jobs = engine.jobs()

        async def go() -> int:
            try:
                if everything:
                    return await _cleanup_all(remote, jobs, yes)
                kept = _kept_for_download(jobs)
                for job, task in kept:
                    print(
                        f"{job.input_file} (task {task.index}): kept: {task.batch_name} and its "
                        "results are the only copy (the download failed); "
                        f"`gembatch retry {job.input_file}` downloads them"
                    )
                targets = [
                    (job, task, names)
                    for job in jobs
                    for task in job.tasks
                    if (names := cleanup_targets(task))  # asked for: whatever the backoff
                ]
                if not targets:
                    print(
                        "nothing to clean up: no finished job left remote files"
                        + (" (besides the results kept above)" if kept else "")
                    )
                    return 0
                for job, task, names in targets:
                    print(f"{job.input_file} (task {task.index}): {', '.join(names.values())}")
                count = sum(len(n) for _, _, n in targets)
                _confirm(yes, f"delete these {count} remote items?")
                errors = await engine.cleanup_remote(job_ids={job.id for job, _, _ in targets})
                for message in errors:
                    print(message, file=sys.stderr)
                print(f"deleted {count - len(errors)} of {count} remote items")
                return 1 if errors else 0
            finally:
                await remote.aclose()

        code = common.run(go())
    raise typer.Exit(code)


def _kept_for_download(jobs: list[Any]) -> list[tuple[Any, Any]]:
    """Tasks whose batch succeeded but whose download failed (not yet retried): their
    remote output is the only copy of results already paid for."""
    from gembatch.engine.reducers import download_failed

    return [
        (job, task)
        for job in jobs
        for task in job.tasks
        if download_failed(task) and "replaced_by" not in task.extra
    ]


async def _cleanup_all(remote: Any, jobs: list[Any], yes: bool) -> int:
    """The original tool's `cleanup`, made safe: every page is read, and nothing that is
    still pending or running, no file such a batch reads (whichever tool created it), and
    nothing an unfinished job of this ledger uses or whose download it still owes, is
    deleted."""
    protected = {
        name
        for job in jobs
        if not job.status.terminal
        for task in job.tasks
        for name in (task.uploaded_file_name, task.batch_name, task.output_file)
        if name
    }
    for _, task in _kept_for_download(jobs):  # the only copy of paid-for results
        protected.update(n for n in (task.batch_name, task.output_file) if n)
    # Every page, each batch with the input file it reads (from the raw Operation).
    listed = await remote.list_batches()
    protected |= {b.input_file for b in listed if b.input_file and not b.state.terminal}
    files = await remote.list_files()
    doomed_batches = [b for b in listed if b.state.terminal and b.name not in protected]
    kept = [b for b in listed if not b.state.terminal or b.name in protected]
    doomed_files = [f for f in files if f["name"] not in protected]
    kept_files = len(files) - len(doomed_files)
    print(
        f"{len(doomed_batches)} finished batch(es) and {len(doomed_files)} file(s) in the "
        f"project will be deleted; {len(kept)} batch(es) and {kept_files} file(s) are left "
        "alone (pending or running batches and their input files, and what this ledger's "
        "unfinished jobs or failed downloads still need)"
    )
    if not doomed_batches and not doomed_files:
        return 0
    _confirm(yes, "delete them? This includes other tools' files and undownloaded results")
    errors = 0
    for batch in doomed_batches:
        try:
            await remote.delete_batch(batch.name)
        except Exception as exc:
            errors += 1
            print(f"delete {batch.name}: {exc}", file=sys.stderr)
    for file in doomed_files:
        try:
            await remote.delete_file(file["name"])
        except Exception as exc:
            errors += 1
            print(f"delete {file['name']}: {exc}", file=sys.stderr)
    print(
        f"deleted {len(doomed_batches)} batch(es) and {len(doomed_files)} file(s)"
        + (f"; {errors} failed" if errors else "")
    )
    return 1 if errors else 0


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(f"{question} Not on a terminal: add -y to confirm")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)
