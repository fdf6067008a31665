"""Servers that announce, in one line, that they listen; and the harness that waits for it.

Why: the emulator and `gembatch serve` run under uvicorn on a port the OS may pick (port
0), and whoever starts them (tests, benchmarks, users' own suites) must learn when and
where they listen without polling the port or sleeping. The server side binds the socket
first, serves it, and prints `<prefix>http://host:port` once uvicorn accepts connections;
the harness starts the process, reads its output up to that line, then copies the rest
to a log file. Both servers and both harnesses share this one implementation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Self

import uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: the OS picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named as TCP (not protocol 0): asyncio sets TCP_NODELAY only on connections whose
    # socket says IPPROTO_TCP. Without it, Nagle holds back the body of every answer on a
    # kept-alive connection (uvicorn writes headers and body separately) until the
    # client's delayed ACK, 40 ms later: each call took 40 ms more than it should.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited on Linux
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_announced(server: uvicorn.Server, sock: socket.socket, ready_line: str) -> None:
    """Serve `sock` until the server stops, printing `ready_line` once it accepts
    connections. The event loop is uvicorn's choice (uvloop when it is installed)."""

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            print(ready_line, flush=True)
        await serving

    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(run())


def _start_announced(
    cmd: Sequence[str],
    ready_prefix: str,
    log_path: Path,
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str]:
    """Start `cmd` and return once it printed a line starting with `ready_prefix`: the
    process and the URL that follows the prefix. All its output goes to `log_path`."""
    environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    assert proc.stdout is not None
    log = open(log_path, "a")  # noqa: SIM115 - closed by the reader thread
    deadline = time.monotonic() + timeout
    while True:
        line = proc.stdout.readline()
        if not line:
            log.close()
            _kill(proc)  # reaps it; kills one that closed its output but lives on
            raise RuntimeError(f"{what} exited before it was ready; see {log_path}")
        log.write(line)
        log.flush()
        if line.startswith(ready_prefix):
            url = line[len(ready_prefix) :].split()[0]
            break
        if time.monotonic() > deadline:
            log.close()
            _kill(proc)
            raise RuntimeError(f"{what} not ready after {timeout} s; see {log_path}")
    threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True).start()
    return proc, url


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen[str] | None, timeout: float) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than `timeout` s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill(proc: subprocess.Popen[str] | None) -> None:
    """SIGKILL: no chance to flush or clean up."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


class ServerProcess:
    """A server in a child process that announces its URL: the base of the emulator's and
    the service's harnesses, which say how to start it (`command`) and where it logs."""

    what = "server"
    ready_prefix = ""
    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(
        self, log_path: Path, port: int, env: Mapping[str, str] | None, cwd: Path | None = None
    ) -> None:
        self.log_path = log_path
        self.port = port
        self.env = dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> Self:
        """Start the server (on `port`; 0: the OS picks one) and wait for its ready line."""
        self.proc, url = _start_announced(
            self.command(),
            self.ready_prefix,
            self.log_path,
            what=self.what,
            env=self.env,
            cwd=self.cwd,
            timeout=self.start_timeout if timeout is None else timeout,
        )
        self.port = _port_of(url)
        return self

    def stop(self, timeout: float | None = None) -> None:
        _stop(self.proc, self.stop_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        _kill(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _drain(stream: IO[str], log: IO[str]) -> None:
    try:
        for line in stream:
            log.write(line)
            log.flush()
    finally:
        log.close()
