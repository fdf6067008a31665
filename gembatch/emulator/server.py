"""Running the emulator: in the foreground (`gembatch emulator`) or in a thread (`--local`).

Why: tests need a real process on a port the OS picks (port 0), announced on stdout;
`--local` needs the same server inside the command's own process, gone when it exits.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import uvicorn

from gembatch.emulator.app import Emulator
from gembatch.emulator.config import EmulatorConfig
from gembatch.processes import bind, http_url, serve_announced

READY_PREFIX = "gembatch emulator listening on "


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "gembatch" / "emulator"


def _uvicorn_config(emulator: Emulator, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        emulator,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
        backlog=2048,
    )


def serve(host: str, port: int, state_dir: Path, config: EmulatorConfig) -> None:
    """Serve until interrupted; print the ready line once the socket is listening."""
    sock = bind(host, port)
    actual_port = sock.getsockname()[1]
    emulator = Emulator(state_dir, config)
    server = uvicorn.Server(_uvicorn_config(emulator, host, actual_port))
    serve_announced(
        server, sock, f"{READY_PREFIX}{http_url(host, actual_port)} (state: {state_dir})"
    )


class EmulatorThread:
    """The emulator served from a background thread of this process."""

    def __init__(
        self, state_dir: Path, config: EmulatorConfig | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.state_dir = state_dir
        self.config = config or EmulatorConfig()
        self.host = host
        self._sock = bind(host, 0)
        self.port = self._sock.getsockname()[1]
        self.emulator = Emulator(state_dir, self.config)
        self._server = uvicorn.Server(_uvicorn_config(self.emulator, host, self.port))
        self._thread = threading.Thread(target=self._run, name="gembatch-emulator", daemon=True)
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._server.config.get_loop_factory()) as runner:
                runner.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout: float = 15.0) -> EmulatorThread:
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the built-in emulator failed to start: {self._error}")
            if waited > timeout:
                raise RuntimeError("the built-in emulator did not start in time")
            threading.Event().wait(0.01)
            waited += 0.01
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
