"""Peak memory of `gembatch serve` while it takes a 50 MB create body, by each way in.

Why: bodies of up to 2 GB are allowed, and a 27 MB JSON body once raised the service's
peak memory by 277 MB (the body parsed whole, then a model of it). Each body is now
streamed to disk and read from there, so the peak may grow by at most the body's size
plus 64 MiB. Measured on a real service process, by the kernel: VmHWM (peak resident
memory) of /proc/<pid>/status, reset before each body through /proc/<pid>/clear_refs.
A memory bound, not a timing one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gembatch.server.process import ServiceProcess
from tests.server.conftest import ServiceLauncher, request_item

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads peak memory from Linux's /proc"
)
BODY_BYTES = 50 * 1000 * 1000
SLACK = 64 * 1024 * 1024
HELD = {"clock": {"pending_seconds": 600, "running_seconds": 1}}


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has had (since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the current RSS


def lines(total: int) -> Iterator[bytes]:
    """JSONL request lines adding up to about `total` bytes (~250 bytes each)."""
    size = n = 0
    while size < total:
        n += 1
        line = json.dumps(request_item(f"k{n}", f"prompt {n} " + "x" * 200)).encode() + b"\n"
        size += len(line)
        yield line


@pytest.fixture(scope="module")
def svc(module_service_factory: ServiceLauncher) -> ServiceProcess:
    return module_service_factory(emulator_config=HELD)


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bodies") / "input.jsonl"
    with open(path, "wb") as out:
        out.writelines(lines(BODY_BYTES))
    return path


def json_body(jsonl_file: Path) -> bytes:
    items = jsonl_file.read_bytes().rstrip(b"\n").replace(b"\n", b",")
    return b'{"model": "gemini-2.5-flash-lite", "requests": [' + items + b"]}"


@pytest.mark.parametrize("way", ["json", "job-operations", "multipart", "jsonl"])
def test_a_50_mb_body_raises_peak_memory_by_at_most_its_size_plus_64_mib(
    svc: ServiceProcess, jsonl_file: Path, way: str
) -> None:
    assert svc.proc is not None
    pid = svc.proc.pid
    with svc.client(timeout=300) as client:
        # Warm up: the first create imports and connects what every later one uses.
        warm = client.post("/api/job/batch", json={"requests": [request_item("w")]})
        assert warm.status_code == 200, warm.text
        if way in ("json", "job-operations"):
            content = json_body(jsonl_file)
            if way == "job-operations":
                content = b'{"action": "createJob", "data": ' + content + b"}"
            size = len(content)
            reset_peak(pid)
            before = peak_rss(pid)
            path = "/api/job/batch" if way == "json" else "/job-operations"
            response = client.post(
                path, content=content, headers={"Content-Type": "application/json"}
            )
            del content
        elif way == "multipart":
            size = jsonl_file.stat().st_size
            reset_peak(pid)
            before = peak_rss(pid)
            with open(jsonl_file, "rb") as handle:
                response = client.post("/api/job/batch", files={"file": ("big.jsonl", handle)})
        else:
            size = jsonl_file.stat().st_size
            reset_peak(pid)
            before = peak_rss(pid)
            with open(jsonl_file, "rb") as handle:
                response = client.post(
                    "/api/job/batch",
                    content=handle,
                    headers={"Content-Type": "application/jsonl"},
                )
        grown = peak_rss(pid) - before
        assert response.status_code == 200, response.text[:2000]
        job_id = response.json()["job_id"]
        status = client.get(f"/api/job/{job_id}/status").json()
        assert status["requests"]["total"] > 150_000, status
    assert size >= BODY_BYTES
    assert grown <= size + SLACK, f"peak grew by {grown / 2**20:.0f} MiB for {size} bytes"
