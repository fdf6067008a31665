"""`gembatch results`: join outputs to inputs by key; list failed and missing keys."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gembatch.cli import common
from gembatch.cli.app import app
from gembatch.errors import UserError


@app.command()
def results(
    ctx: typer.Context,
    file: str = typer.Argument(..., metavar="FILE|JOB", help="An input file or a job id."),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or csv."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write here, not stdout."),
) -> None:
    """One record per input key, in input order: succeeded (with the answer text),
    failed (with the error) or missing. Exit 1 when any key failed or is missing."""
    from gembatch.jobs import Job
    from gembatch.results import join_results

    if fmt not in ("jsonl", "csv"):
        raise UserError(f"--format must be jsonl or csv, not {fmt!r}")
    snapshot = common.ledger_for(ctx).load()
    jobs = []
    for record in snapshot.records:
        try:
            jobs.append(Job.from_record(record))
        except (KeyError, ValueError, TypeError):
            continue
    try:
        job = common.find_job(jobs, file)
        input_path = Path(job.input_path or job.input_file)
        result_path = Path(job.result_file) if job.result_file else None
    except UserError:
        # Not in this ledger: join a request file with results/<name> beside it.
        input_path = Path(file)
        if not input_path.is_file():
            raise
        result_path = input_path.parent / "results" / input_path.name
    if not input_path.is_file():
        raise UserError(f"{input_path}: the input file is gone; results are joined to it by key")
    if result_path is not None and not result_path.is_file():
        result_path = None
    out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout  # noqa: SIM115
    try:
        summary = join_results(input_path, result_path, out, fmt)
    finally:
        if output:
            out.close()
    total = summary.succeeded + len(summary.failed) + len(summary.missing)
    line = f"{input_path}: {summary.succeeded} of {total} succeeded"
    if summary.failed:
        line += f", {len(summary.failed)} failed ({_keys(summary.failed)})"
    if summary.missing:
        line += f", {len(summary.missing)} missing ({_keys(summary.missing)})"
    if result_path is None:
        line += "; no results file yet (is the job finished? `gembatch status`)"
    print(line, file=sys.stderr)
    raise typer.Exit(1 if summary.failed or summary.missing else 0)


def _keys(keys: list[str], shown: int = 5) -> str:
    head = ", ".join(keys[:shown])
    return head + (f", ... {len(keys) - shown} more" if len(keys) > shown else "")
