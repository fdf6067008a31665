"""How `gembatch serve` is set up: API tokens from `$GEMBATCH_TOKENS` (with or without a
tokens file), the refusal to listen beyond localhost without tokens, bad token settings
refused before anything starts, and the SQLite ledger in WAL mode.

Real `gembatch serve` processes (on a real emulator when they are meant to start); the
refusals are judged by exit code and message, and by what they left on disk.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gembatch.server.run import READY_PREFIX
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    create_job,
    inline_body,
    wait_status,
)

ALICE = "alice-env-token-0123456789"
BOB = "bob-env-token-0123456789ab"
CAROL = "carol-file-token-0123456789"


def test_tokens_from_the_environment_map_users_and_keep_them_apart(
    service_factory: ServiceLauncher,
) -> None:
    # Alice and Bob from $GEMBATCH_TOKENS, Carol from a tokens file: both sources count.
    svc = service_factory(
        FAST_EMULATOR_CONFIG,
        tokens={"carol": CAROL},
        env={"GEMBATCH_TOKENS": f" {ALICE}:alice, {BOB}:bob ,"},
        args=["--host", "0.0.0.0"],  # allowed: tokens are configured
    )
    with svc.client(ALICE) as alice, svc.client(BOB) as bob, svc.client(CAROL) as carol:
        jobs = {
            "alice": create_job(alice, inline_body(2, prefix="a")),
            "bob": create_job(bob, inline_body(1, prefix="b")),
            "carol": create_job(carol, inline_body(1, prefix="c")),
        }
        clients = {"alice": alice, "bob": bob, "carol": carol}
        for user, client in clients.items():
            assert wait_status(client, jobs[user], TERMINAL)["status"] == "completed"
        for user, client in clients.items():
            listed = [job["job_id"] for job in client.get("/api/jobs").json()["jobs"]]
            assert listed == [jobs[user]], user
            for other, job_id in jobs.items():
                if other == user:
                    continue
                for response in (
                    client.get(f"/api/job/{job_id}/status"),
                    client.get(f"/api/job/{job_id}/results"),
                    client.delete(f"/api/job/{job_id}"),
                ):
                    assert response.status_code == 404, (user, other, response.text)
        for user, client in clients.items():  # nothing of theirs was touched
            assert client.get(f"/api/job/{jobs[user]}/status").json()["status"] == "completed"
        with svc.client() as anonymous, svc.client(ALICE[:-1]) as near_miss:
            for client in (anonymous, near_miss):
                response = client.get("/api/jobs")
                assert response.status_code == 401, response.text
                assert "token" in response.json()["detail"]


def _serve(tmp_path: Path, *args: str, tokens: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GEMBATCH_TOKENS"}
    env.update(GEMINI_API_KEY="not-used", GOOGLE_GEMINI_BASE_URL="http://127.0.0.1:9")
    if tokens is not None:
        env["GEMBATCH_TOKENS"] = tokens
    command = [
        sys.executable, "-m", "gembatch", "serve", "--port", "0",
        "--db", f"sqlite:///{tmp_path / 'gembatch.db'}", "--data-dir", str(tmp_path / "data"),
        *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "gembatch.example"])
def test_a_non_localhost_address_without_tokens_is_refused(tmp_path: Path, host: str) -> None:
    run = _serve(tmp_path, "--host", host)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert f"refusing to serve on {host} without API tokens" in run.stderr, output
    assert "--tokens" in run.stderr and "GEMBATCH_TOKENS" in run.stderr, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "gembatch.db").exists(), "nothing is created before the refusal"
    assert not (tmp_path / "data").exists()


def test_an_empty_host_without_tokens_is_refused_not_bound_to_every_interface(
    tmp_path: Path,
) -> None:
    """`--host ''` means every interface to the socket layer: it is not localhost. The
    server is started as a process and judged by whether it ever said it listens (a
    refusal exits at once; a server that listens is stopped by the test)."""
    env = {k: v for k, v in os.environ.items() if k != "GEMBATCH_TOKENS"}
    env.update(GEMINI_API_KEY="not-used", GOOGLE_GEMINI_BASE_URL="http://127.0.0.1:9")
    command = [
        sys.executable, "-m", "gembatch", "serve", "--port", "0", "--host", "",
        "--db", f"sqlite:///{tmp_path / 'gembatch.db'}", "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = ""
        for line in proc.stdout:  # until it exits, or says it listens
            output += line
            assert READY_PREFIX not in line, f"it listens on every interface: {line}"
        assert proc.wait(timeout=60) != 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "refusing to serve on '' (every interface) without API tokens" in output, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "gembatch.db").exists(), "nothing is created before the refusal"


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("short:alice", "at least 16 characters"),
        (f"{ALICE}:", "token:user"),
    ],
)
def test_bad_gembatch_tokens_are_refused_with_a_clear_message(
    tmp_path: Path, tokens: str, message: str
) -> None:
    run = _serve(tmp_path, tokens=tokens)
    assert run.returncode != 0
    assert message in run.stderr, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert not (tmp_path / "gembatch.db").exists()


def test_the_sqlite_ledger_runs_in_wal_mode(service_factory: ServiceLauncher) -> None:
    svc = service_factory(FAST_EMULATOR_CONFIG)
    with svc.client() as client:
        job_id = create_job(client, inline_body(1))
        assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
        path = svc.db_url.removeprefix("sqlite:///")
        # Read-only, from another process's point of view: what the file itself says.
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert Path(f"{path}-wal").exists(), "the service writes through the WAL"
        assert client.get(f"/api/job/{job_id}/status").json()["status"] == "completed"
