"""The `gembatch` command line. Each command lives in its own module and calls the engine."""

from __future__ import annotations

import sys

import typer

# Importing a command module registers its command on `app`.
from gembatch.cli import (  # noqa: F401
    cancel_cmd,
    cleanup_cmd,
    db_cmd,
    demo_cmd,
    emulator_cmd,
    info_cmd,
    poll_cmd,
    results_cmd,
    serve_cmd,
    status_cmd,
    submit_cmd,
)
from gembatch.cli.app import app
from gembatch.errors import UserError


def _click_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort, Exit) classes of the click that typer really uses: typer
    0.29 bundles its own (`typer._click`, whose exceptions are not the installed click's);
    older typers use click itself. Both families are caught, whichever is present."""
    usage: list[type] = []
    abort: list[type] = [typer.Abort]
    exit_: list[type] = [typer.Exit]
    try:
        from typer._click import exceptions as bundled  # type: ignore[import-not-found]

        usage.append(bundled.ClickException)
        abort += [c for c in (getattr(bundled, "Abort", None),) if c is not None]
        exit_ += [c for c in (getattr(bundled, "Exit", None),) if c is not None]
    except ImportError:
        pass
    try:
        import click

        usage.append(click.ClickException)
        abort.append(click.exceptions.Abort)
        exit_.append(click.exceptions.Exit)
    except ImportError:
        pass
    return tuple(usage), tuple(abort), tuple(exit_)


def main() -> None:
    from gembatch.cli.pipes import flush_standard_streams, guard_standard_streams
    from gembatch.runtime import tune_gc

    tune_gc()
    guard_standard_streams()  # `gembatch ... | head -1`: exit 141, nothing on stderr
    code = _run()
    flush_standard_streams()  # a reader gone by now ends it the same way
    sys.exit(code)


def _run() -> int | str | None:
    """Run the command; its exit code (or a message for SystemExit to print)."""
    usage, abort, exit_ = _click_classes()
    try:
        code = app(standalone_mode=False)
        return code if isinstance(code, int) else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code
    except exit_ as exc:
        return getattr(exc, "exit_code", 0)
    except usage as exc:  # a usage error: click's short message, no traceback
        exc.show()  # type: ignore[attr-defined]
        return getattr(exc, "exit_code", 2)
    except abort:
        print("aborted", file=sys.stderr)
        return 1
