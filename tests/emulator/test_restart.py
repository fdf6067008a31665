"""A restarted emulator (even after SIGKILL) still knows its files, batches and counts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.conftest import wait_for, write_requests


def test_state_survives_sigkill_and_restart(emulator_factory: Any, tmp_path: Path) -> None:
    emulator = emulator_factory({"clock": {"pending_seconds": 0.5, "running_seconds": 1.0}})
    client = emulator.sdk_client()
    path = write_requests(tmp_path / "in.jsonl", [f"p{i}" for i in range(10)])
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    batch = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "survivor"}
    )
    port = emulator.port

    emulator.kill()
    time.sleep(0.3)
    emulator.start()

    assert emulator.port == port
    client = emulator.sdk_client()
    assert client.files.get(name=uploaded.name).size_bytes == path.stat().st_size
    final = wait_for(
        lambda: (b := client.batches.get(name=batch.name)).state.name == "JOB_STATE_SUCCEEDED" and b
    )
    lines = client.files.download(file=final.dest.file_name).decode().splitlines()
    assert len(lines) == 10
    stats = emulator.stats()
    assert stats["creates_by_display_name"] == {"survivor": 1}
    assert stats["uploads"] == 1
