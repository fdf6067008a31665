"""`gembatch emulator`: serve the built-in Gemini emulator."""

from __future__ import annotations

from pathlib import Path

import typer

from gembatch.cli.app import app
from gembatch.errors import UserError


@app.command()
def emulator(
    host: str = typer.Option("127.0.0.1", metavar="ADDRESS", help="Address to listen on."),
    port: int = typer.Option(8765, metavar="PORT", help="Port to listen on (0: any free port)."),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        metavar="DIR",
        help="Where files and batches are kept across restarts (default: "
        "$XDG_STATE_HOME/gembatch/emulator, else ~/.local/state/gembatch/emulator).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="Emulator settings: clock, faults, responder (.toml or .json; see the README).",
    ),
) -> None:
    """Serve a local Gemini Files + Batch API that the google-genai SDK can use.

    Point clients at it with GOOGLE_GEMINI_BASE_URL=http://HOST:PORT and any API key.
    Ctrl-C stops it; its files and batches are still there when it starts again.
    """
    from gembatch.emulator.config import ConfigError, load_config
    from gembatch.emulator.server import default_state_dir, serve

    try:
        settings = load_config(config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    directory = state_dir or default_state_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot use state directory {directory}: {exc.strerror}") from None
    try:
        serve(host, port, directory, settings)
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
        ) from None
    except KeyboardInterrupt:
        pass
