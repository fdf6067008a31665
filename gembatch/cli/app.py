"""The `gembatch` Typer application and its global options.

Why the classes below: Typer 0.29 shows each parameter's Python type in `--help`
(`<bool>` for every flag and `--help` itself, `<path>`, `<list[str]>`) and lists commands
in the order their modules are imported. Here a flag shows no value, an option or argument
shows its metavar (`PATH`, `N`, `SECONDS`; a test checks that every one has one), and
commands come in the order a user meets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from gembatch import __version__

DEFAULT_MODEL = "gemini-2.5-flash-lite"

# `gembatch --help` lists commands in this order: the batch workflow first, then the
# service and its database, then the emulator and the demo. Others follow, as registered.
COMMAND_ORDER = (
    "submit",
    "poll",
    "run",
    "status",
    "results",
    "retry",
    "cancel",
    "cleanup",
    "info",
    "serve",
    "db",
    "emulator",
    "demo",
)


class _ValuesByName:
    """Command and group mixin: `--help` shows no value for a flag (nor for `--help`) and
    the metavar of an option or argument, never its Python type."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _show_by_name(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _show_by_name(option)
        return option


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        # The metavar is already in the name column: the type beside it says nothing more.
        return None if self.metavar else super().display_type_rich(ctx)

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        # `FILE...` and `[JOB]`, as Unix usage lines write them (Typer 0.29: `{FILE}...`).
        name = self.metavar or (self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return [name + ("..." if self.nargs != 1 else "")]


def _show_by_name(param: Any) -> None:
    if type(param) is TyperArgument:
        param.__class__ = _Argument  # Typer creates the argument; only its display changes
    elif getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # Typer shows a metavar, if any, instead of the type


class Command(_ValuesByName, TyperCommand):
    """Every gembatch command."""


class Group(_ValuesByName, TyperGroup):
    """`gembatch` and `gembatch db`: subcommands in COMMAND_ORDER (others as registered)."""

    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda n: rank.get(n, len(rank)))


class Typer(typer.Typer):
    """typer.Typer whose groups and commands are the classes above (db_cmd's too)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = Typer(
    name="gembatch",
    help="Run thousands of Gemini requests through the Gemini Batch API, safely.\n\n"
    "Try `gembatch demo` (offline, no API key). Then set GEMINI_API_KEY and run "
    "`gembatch submit FILE...` and `gembatch poll` (or, offline, `gembatch --local submit "
    "FILE...` and `gembatch --local poll`).",
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
        metavar="PATH",
        help="The ledger: the JSONL file where every job is recorded.",
        show_default=True,
        readable=False,
    ),
    local: bool = typer.Option(
        False,
        "--local",
        help="Use the built-in Gemini emulator, started inside the command (no API key); "
        "its state is kept in .gembatch-emulator/ beside the ledger.",
    ),
    verbose: bool = typer.Option(
        False, "-v", "--verbose", help="Show more detail (reserved: no command prints more yet)."
    ),
    version: bool = typer.Option(
        False,
        "--version",
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
