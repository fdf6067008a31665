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
    host: str = typer.Option(
        "127.0.0.1",
        metavar="ADDRESS",
        help="Address to listen on (without --tokens: localhost or a loopback address only).",
    ),
    port: int = typer.Option(8080, metavar="PORT", help="Port to listen on (0: any free port)."),
    db: str = typer.Option(
        "sqlite:///gembatch.db",
        "--db",
        metavar="URL",
        help="The service's database: sqlite:///PATH, or postgresql://... for several servers.",
    ),
    data_dir: Path = typer.Option(
        Path("gembatch-data"),
        "--data-dir",
        metavar="DIR",
        help="Where jobs' inputs and results are kept, and input_file paths are looked up.",
    ),
    tokens: Path | None = typer.Option(
        None,
        "--tokens",
        metavar="FILE",
        help="API tokens, one `TOKEN USER` per line (or $GEMBATCH_TOKENS); without any, the "
        "service has one local user.",
    ),
    max_upload_mb: int = typer.Option(
        2048, "--max-upload-mb", metavar="MB", help="Largest request body accepted, in MiB."
    ),
    poll_interval: float = typer.Option(
        10.0,
        "--poll-interval",
        metavar="SECONDS",
        help="Time between two checks of the remote batches.",
    ),
    max_live_batches: int = typer.Option(
        10,
        "--max-live-batches",
        metavar="N",
        help="Remote batches pending or running at once, all jobs together (Gemini allows 100).",
    ),
    ping_interval: float = typer.Option(
        30.0,
        "--ping-interval",
        metavar="SECONDS",
        help="A live stream (SSE) with no event for this long gets a ping.",
    ),
    event_requery_interval: float = typer.Option(
        5.0,
        "--event-requery-interval",
        metavar="SECONDS",
        help="PostgreSQL: re-read the events of followed jobs this often, in case a "
        "notification from another server was lost.",
    ),
    lease_seconds: float = typer.Option(
        30.0,
        "--lease-seconds",
        metavar="SECONDS",
        help="PostgreSQL: how long a server's claim on a job outlives the server's silence "
        "before another server takes the job over.",
    ),
    notify_url: str | None = typer.Option(
        None,
        "--notify-url",
        metavar="URL",
        help="POST a JSON message here whenever a job finishes (a public http(s) URL).",
    ),
    notify_allow_private: bool = typer.Option(
        False,
        "--notify-allow-private",
        help="Let webhooks go to loopback and private addresses (tests, intranets).",
    ),
    notify_attempts: int = typer.Option(
        8, "--notify-attempts", metavar="N", help="Tries to deliver one webhook before giving up."
    ),
    notify_max_delay: float = typer.Option(
        300.0,
        "--notify-max-delay",
        metavar="SECONDS",
        help="Longest wait between two tries of a webhook.",
    ),
    model: str | None = typer.Option(
        None,
        "-m",
        "--model",
        metavar="MODEL",
        help="Model of jobs that name none (default: $GEMBATCH_MODEL, else gemini-2.5-flash-lite).",
    ),
    log_level: str = typer.Option(
        "warning",
        "--log-level",
        metavar="LEVEL",
        help="The HTTP server's log level: critical, error, warning, info, debug or trace.",
    ),
) -> None:
    """Serve the job API: create jobs over HTTP, follow them by polling or SSE.

    The same engine as the command line, behind an HTTP API, with a web page at / and
    the API's documentation at /docs. Needs GEMINI_API_KEY (or --local).
    """
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
