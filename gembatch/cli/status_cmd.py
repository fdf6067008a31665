"""`gembatch status`: the ledger as a table or JSON, without touching the network."""

from __future__ import annotations

import json
import sys
import time

import typer

from gembatch.cli import common
from gembatch.cli.app import app


@app.command()
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="One JSON array instead of a table."),
) -> None:
    """Show every job in the ledger: state, progress, times. No network.

    Ledger lines that cannot be read are named on stderr (LEDGER:LINE) and the exit code
    is then 1.
    """
    from gembatch.cli.monitor import status_json, status_table
    from gembatch.jobs import Job

    ledger = common.ledger_for(ctx)
    snapshot = ledger.load()  # lines it cannot use are reported on stderr as PATH:LINE: ...
    jobs = []
    lines = snapshot.lines or [0] * len(snapshot.records)
    for record, line in zip(snapshot.records, lines, strict=True):
        try:
            jobs.append(Job.from_record(record))
        except (KeyError, ValueError, TypeError) as exc:
            where = f"{ledger.path}:{line}" if line else f"{ledger.path}"
            print(f"{where}: job {record.get('id')}: unreadable ({exc})", file=sys.stderr)
    if as_json:
        json.dump(status_json(jobs), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    elif not jobs:
        print(f"no jobs in {ledger.path}", file=sys.stderr)
    else:
        from rich.console import Console

        Console().print(status_table(jobs, time.time()))
    raise typer.Exit(1 if ledger.problem_report.seen else 0)
