"""Serving the app: bind (port 0 allowed), announce the URL, run until stopped."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

READY_PREFIX = "gembatch serve listening on "


def serve(app: Any, host: str, port: int, *, log_level: str = "warning") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host=host, port=actual, log_level=log_level, access_log=False, lifespan="on",
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            print(f"{READY_PREFIX}http://{url_host}:{actual}", flush=True)
        await serving

    try:  # uvicorn's loop="auto" picks uvloop only when uvicorn runs the loop itself
        import uvloop
    except ImportError:  # pragma: no cover - a dependency except on Windows
        asyncio.run(run())
    else:
        uvloop.run(run())
