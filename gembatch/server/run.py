"""Serving the app: bind (port 0 allowed), announce the URL, run until stopped."""

from __future__ import annotations

from typing import Any

import uvicorn

from gembatch.processes import bind, http_url, serve_announced

READY_PREFIX = "gembatch serve listening on "


def serve(app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host=host, port=actual, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    serve_announced(uvicorn.Server(config), sock, f"{READY_PREFIX}{http_url(host, actual)}")
