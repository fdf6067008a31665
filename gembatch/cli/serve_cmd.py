"""`gembatch serve`: the HTTP job service (seeds 003 and 004)."""

from __future__ import annotations

from pathlib import Path

import typer

from gembatch.cli import common
from gembatch.cli.app import app, settings
from gembatch.errors import UserError


@app.command()
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, help="Port (0: any free port)."),
    db: str = typer.Option("sqlite:///gembatch.db", "--db", help="The ledger database URL."),
    data_dir: Path = typer.Option(
        Path("gembatch-data"), "--data-dir", help="Inputs, results, and files for input_file."
    ),
    tokens: Path | None = typer.Option(
        None, "--tokens", help="API tokens: one `TOKEN USER` per line (or $GEMBATCH_TOKENS)."
    ),
    max_upload_mb: int = typer.Option(2048, "--max-upload-mb", help="Largest request body."),
    poll_interval: float = typer.Option(10.0, "--poll-interval", help="Seconds between polls."),
    max_live_batches: int = typer.Option(10, "--max-live-batches", help="Live remote batches."),
    ping_interval: float = typer.Option(30.0, "--ping-interval", help="SSE ping when idle (s)."),
    event_requery_interval: float = typer.Option(
        5.0,
        "--event-requery-interval",
        help="PostgreSQL: re-read followed jobs' events this often without a NOTIFY (s).",
    ),
    lease_seconds: float = typer.Option(
        30.0,
        "--lease-seconds",
        help="PostgreSQL: how long a claim outlives a silent server before another takes over.",
    ),
    notify_url: str | None = typer.Option(
        None, "--notify-url", help="POST every finished job here (JSON)."
    ),
    notify_allow_private: bool = typer.Option(
        False,
        "--notify-allow-private",
        help="Let webhooks go to loopback and private addresses (tests, intranets).",
    ),
    notify_attempts: int = typer.Option(
        8, "--notify-attempts", help="Deliveries of one webhook before giving up."
    ),
    notify_max_delay: float = typer.Option(
        300.0, "--notify-max-delay", help="Longest wait between webhook retries (s)."
    ),
    model: str | None = typer.Option(None, "-m", "--model", help="Default model for jobs."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level."),
) -> None:
    """Serve the job API: create jobs over HTTP, follow them by polling or SSE."""
    import os

    import filelock

    from gembatch.cli.flow import tuned
    from gembatch.engine.engine import EngineSettings
    from gembatch.gemini.client import BASE_URL_ENV, require_api_key
    from gembatch.server.app import create_app
    from gembatch.server.run import serve as run_server
    from gembatch.server.settings import ServerSettings, load_tokens

    options = ServerSettings(
        db_url=db,
        data_dir=data_dir,
        host=host,
        port=port,
        tokens=load_tokens(tokens),
        tokens_file=tokens,
        max_upload_bytes=max_upload_mb * 1024 * 1024,
        poll_interval=poll_interval,
        max_live_batches=max_live_batches,
        ping_interval=ping_interval,
        event_requery_interval=event_requery_interval,
        notify_url=notify_url,
        notify_allow_private=notify_allow_private,
        notify_attempts=notify_attempts,
        notify_max_delay=notify_max_delay,
        model=common.model_name(model),
    )
    options.check()
    lock = None
    if db.startswith("sqlite:///"):
        path = Path(db.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(f"{path}.server.lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise UserError(f"another gembatch serve is using {path}; stop it first") from None
    try:
        with common.local_emulator(settings(ctx)):
            options.api_key = require_api_key()
            options.base_url = os.environ.get(BASE_URL_ENV) or None
            engine_settings = tuned(
                EngineSettings(
                    max_live_batches=max_live_batches,
                    poll_concurrency=options.poll_concurrency,
                    # Several servers may share PostgreSQL: claims are renewed leases.
                    lease_seconds=lease_seconds if db.startswith("postgresql") else None,
                    # A holder whose lease ran out may be stalled mid-create: longer grace.
                    create_grace_seconds=15.0
                    if db.startswith("postgresql")
                    else EngineSettings.create_grace_seconds,
                )
            )
            application = create_app(options, engine_settings=engine_settings)
            try:
                run_server(application, host, port, log_level=log_level)
            except OSError as exc:
                raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        if lock is not None:
            lock.release()
