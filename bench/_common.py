"""Helpers shared by the bench scripts: an emulator process, fast set-up, a load generator.

Why: a benchmark must measure gembatch, not its own scaffolding. Setting up 1,000 remote
batches through gembatch's careful submit path would take minutes, and an HTTP client as
heavy as the code under test would share the two cores with it. So set-up goes straight to
the emulator over raw HTTP, and `hammer` is a minimal keep-alive HTTP/1.1 client on
asyncio streams (no parsing beyond the status line and Content-Length).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from gembatch.emulator.process import EmulatorProcess  # noqa: E402
from gembatch.server.process import ServiceProcess  # noqa: E402

API = "v1beta"


def machine_note() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_emulator(config: dict[str, Any], state_dir: Path | None = None) -> EmulatorProcess:
    """An emulator in its own process (as users and tests run it)."""
    return EmulatorProcess(state_dir=state_dir, config=config).start()


def start_service(
    workdir: Path,
    emulator: EmulatorProcess,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    """`gembatch serve` in its own process (single user, SQLite), on this emulator."""
    environment = {**emulator.client_env(), **(env or {})}
    return ServiceProcess(workdir, env=environment, args=list(args)).start()


def create_service_job(base_url: str, requests: int, **options: Any) -> str:
    """One job of `requests` tiny inline requests through the service's API; its id."""
    body = {
        "requests": [
            {"key": f"k{n}", "request": {"contents": [{"parts": [{"text": f"p{n}"}]}]}}
            for n in range(requests)
        ],
        **options,
    }
    response = httpx.post(f"{base_url}/api/job/batch", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["job_id"]


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (children inherit it);
    returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def upload_small_file(base_url: str, api_key: str, lines: int = 1) -> str:
    """Upload a tiny JSONL input with the google-genai SDK; returns "files/<id>"."""
    import io

    from google import genai
    from google.genai import types

    client = genai.Client(api_key=api_key, http_options=types.HttpOptions(base_url=base_url))
    body = "".join(
        json.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"p{i}"}]}]}})
        + "\n"
        for i in range(lines)
    ).encode()
    uploaded = client.files.upload(
        file=io.BytesIO(body), config={"mime_type": "jsonl", "display_name": "bench-input"}
    )
    assert uploaded.name
    return uploaded.name


async def create_batches(
    base_url: str,
    api_key: str,
    file_name: str,
    display_names: Sequence[str],
    *,
    model: str = "models/gemini-2.5-flash-lite",
    concurrency: int = 16,
) -> list[dict[str, Any]]:
    """One batches.create per display name over raw HTTP (no SDK, no gembatch): returns
    the Operation bodies in order."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:

        async def one(display_name: str) -> dict[str, Any]:
            body = {"batch": {"displayName": display_name, "inputConfig": {"fileName": file_name}}}
            async with gate:
                response = await http.post(
                    f"/{API}/{model}:batchGenerateContent",
                    json=body,
                    headers={"x-goog-api-key": api_key},
                )
            response.raise_for_status()
            return response.json()

        return list(await asyncio.gather(*(one(name) for name in display_names)))


# -- a minimal load generator -------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; returns its status. Bodies are sized by Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


async def hammer(
    base_url: str,
    requests: Sequence[tuple[str, str, bytes]],
    *,
    clients: int = 200,
    seconds: float = 5.0,
    api_key: str = "bench-key",
) -> LoadResult:
    """`clients` keep-alive connections, each sending the next (method, path, body) of
    `requests` (round robin) as soon as its previous answer arrived, for `seconds`."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    wire = []
    for method, path, body in requests:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nx-goog-api-key: {api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        wire.append(head.encode() + body)
    done = 0
    errors = 0
    stop_at = 0.0

    async def client(offset: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while time.perf_counter() < stop_at:
                writer.write(wire[i % len(wire)])
                i += 1
                status = await _read_response(reader)
                done += 1
                errors += status != 200
        finally:
            writer.close()

    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(client(i) for i in range(clients)))
    return LoadResult(done, errors, time.perf_counter() - started)
