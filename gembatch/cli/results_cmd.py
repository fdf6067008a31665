"""`gembatch results`: join outputs to inputs by key; list failed and missing keys."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from gembatch.cli import common
from gembatch.cli.app import app
from gembatch.errors import UserError


@app.command()
def results(
    ctx: typer.Context,
    file: str = typer.Argument(
        ..., metavar="FILE|JOB", help="A request file, or the id of its job."
    ),
    fmt: str = typer.Option("jsonl", "--format", metavar="FORMAT", help="jsonl or csv."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        metavar="FILE",
        help="Write to this file (complete, or not at all) instead of stdout.",
    ),
) -> None:
    """Join results to their requests: one record per input key, in input order.

    Each record says succeeded (with the answer text, finish reason and tokens), failed
    (with the error) or missing. A file that is not in the ledger is joined with
    results/NAME beside it. The exit code is 1 when any key failed or is missing.
    """
    from gembatch.jobs import Job

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
    summary = _join(input_path, result_path, output, fmt)
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


def _join(input_path: Path, result_path: Path | None, output: Path | None, fmt: str) -> Any:
    """join_results to stdout or, all or nothing, to `output` (a temporary file renamed
    into place). An input that is not a request file is a UserError naming its line."""
    from gembatch.fsutil import atomic_writer
    from gembatch.inputs import InputInvalid, validate_file
    from gembatch.results import join_results

    try:
        if output is None:
            return join_results(input_path, result_path, sys.stdout, fmt)
        with atomic_writer(output, "w", encoding="utf-8", newline="") as out:
            return join_results(input_path, result_path, out, fmt)
    except ValueError as exc:
        # A line without a key: the file is not a valid request file (any more).
        try:
            validate_file(input_path)
        except InputInvalid as bad:  # file, line and what is wrong
            where = "\n".join(str(bad).splitlines()[1:])
            raise UserError(
                f"{input_path} is not a request file, so no results can be joined to it "
                f"by key:\n{where}"
            ) from None
        raise UserError(f"{exc}; results are joined to its request lines by key") from None
    except OSError as exc:
        where = output if output is not None else "stdout"
        raise UserError(f"cannot write {where}: {exc.strerror or exc}") from None


def _keys(keys: list[str], shown: int = 5) -> str:
    head = ", ".join(keys[:shown])
    return head + (f", ... {len(keys) - shown} more" if len(keys) > shown else "")
