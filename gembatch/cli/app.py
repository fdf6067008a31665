"""The `gembatch` Typer application and its global options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import typer

from gembatch import __version__

DEFAULT_MODEL = "gemini-2.5-flash-lite"

app = typer.Typer(
    name="gembatch",
    help="Run thousands of Gemini requests through the Gemini Batch API, safely.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Settings:
    job_info: Path
    local: bool
    verbose: bool


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gembatch {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    # readable=False: typer's own check ("is not readable") would refuse an unreadable
    # job-info.jsonl in the current directory for every command, even one that never
    # opens it; a command that reads the ledger reports that itself (what to do included).
    job_info: Path = typer.Option(
        Path("job-info.jsonl"),
        "--job-info",
        help="The job ledger (JSONL).",
        show_default=True,
        readable=False,
    ),
    local: bool = typer.Option(
        False,
        "--local",
        metavar="",
        help="Start the built-in Gemini emulator and use it (no API key).",
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", metavar="", help="Show more detail."),
    version: bool = typer.Option(
        False,
        "--version",
        metavar="",
        callback=_print_version,
        is_eager=True,
        help="Show the version.",
    ),
) -> None:
    ctx.obj = Settings(job_info=job_info, local=local, verbose=verbose)


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    assert isinstance(obj, Settings)
    return obj


def default_model() -> str:
    return os.environ.get("GEMBATCH_MODEL") or DEFAULT_MODEL
