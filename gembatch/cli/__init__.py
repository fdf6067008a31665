"""The `gembatch` command line. Each command lives in its own module and calls the engine."""

from __future__ import annotations

import sys

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


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's own usage errors come through here
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
