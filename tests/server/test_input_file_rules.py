"""`input_file` reaches only files the operator put in the data directory, never the
service's own: its copies of every user's uploads (`inputs/<job id>.jsonl`), their results
(`results/...`), hidden files, the database and the tokens file. And job ids are long
enough (64 bits) not to be guessed or to collide.

A real `gembatch serve` with two users on a real emulator; the database and the tokens
file are put inside the data directory on purpose.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    create_job,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)

JOB_ID = re.compile(r"^j[0-9a-f]{16}$")
ALICE = "alice-token-" + "a" * 20
BOB = "bob-token-" + "b" * 20
ALLOWED = "relative to the service's data directory"


@pytest.fixture
def two_user_service(tmp_path: Path) -> Iterator[ServiceProcess]:
    emu = EmulatorProcess(state_dir=tmp_path / "emulator", config=FAST_EMULATOR_CONFIG).start()
    workdir = tmp_path / "service"
    data = workdir / "data"
    data.mkdir(parents=True)
    tokens = data / "tokens.txt"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    svc = ServiceProcess(
        workdir,
        env=emu.client_env(),
        args=["--poll-interval", "0.2", "--tokens", str(tokens)],
        db_url=f"sqlite:///{data / 'ledger.db'}",
    )
    try:
        yield svc.start()
    finally:
        svc.stop()
        emu.close()


def _refused(client: httpx.Client, path: str) -> str:
    response = client.post("/api/job/batch", json={"input_file": path})
    assert response.status_code == 400, f"{path}: {response.status_code} {response.text}"
    return str(response.json()["detail"])


def test_input_file_cannot_name_the_services_own_files(two_user_service: ServiceProcess) -> None:
    svc = two_user_service
    data = svc.data_dir
    with svc.client(ALICE) as alice, svc.client(BOB) as bob:
        secret = alice.post(
            "/api/job/batch",
            files={"file": ("secret.jsonl", jsonl([request_item("alice-1", "alice's prompt")]))},
        )
        assert secret.status_code == 200, secret.text
        job_id = secret.json()["job_id"]
        inline = create_job(alice, inline_body(2, prefix="a"))
        for job in (job_id, inline):
            assert JOB_ID.match(job), job
            assert wait_status(alice, job, TERMINAL)["status"] == "completed"
        upload_copy = f"inputs/{job_id}.jsonl"
        assert (data / upload_copy).is_file(), "the service keeps its copy of the upload"
        results = sorted(p.relative_to(data).as_posix() for p in (data / "results").rglob("*")
                         if p.is_file())  # fmt: skip
        assert f"results/{job_id}.jsonl" in results, results

        # The operator's shared files, and the tricks that lead back to the service's own.
        shared = data / "shared"
        shared.mkdir()
        (shared / "ok.jsonl").write_text(jsonl([request_item("s1")]))
        (shared / "copy-link.jsonl").symlink_to(data / upload_copy)
        (shared / "results-link").symlink_to(data / "results", target_is_directory=True)
        (data / ".hidden.jsonl").write_text(jsonl([request_item("h1")]))
        refused = [
            upload_copy,
            f"inputs/{inline}.jsonl",
            f"./inputs/../inputs/{job_id}.jsonl",
            f"shared/../inputs/{job_id}.jsonl",
            "shared/copy-link.jsonl",
            f"shared/results-link/{job_id}.jsonl",
            *results,
            ".hidden.jsonl",
            "tokens.txt",
            "ledger.db",
            "ledger.db-wal",
            "inputs",
        ]
        for client in (bob, alice):  # not even the owner: the API serves their own data
            for path in refused:
                detail = _refused(client, path)
                assert ALLOWED in detail and "inputs/" in detail, (path, detail)
                assert ALICE not in detail and BOB not in detail, (path, detail)
        assert bob.get("/api/jobs").json()["jobs"] == []

        # What is allowed still works, for both users.
        for client in (alice, bob):
            job = create_job(client, {"input_file": "shared/ok.jsonl"})
            assert wait_status(client, job, TERMINAL)["status"] == "completed"
        assert _refused(bob, "shared/missing.jsonl").endswith("no such file in the data directory")
    assert {p.name for p in (data / "inputs").iterdir()} >= {f"{job_id}.jsonl"}


def test_input_file_cannot_name_a_backup_of_the_database_whatever_its_name(
    two_user_service: ServiceProcess,
) -> None:
    """`gembatch db backup` into the data directory (the operator's habit of keeping it
    all in one place): the copy holds every user's jobs, under a name the service did not
    choose, so it is recognised by what it is, not by its name."""
    svc = two_user_service
    data = svc.data_dir
    with svc.client(ALICE) as alice, svc.client(BOB) as bob:
        secret = create_job(alice, inline_body(1, prefix="alice-secret-"))
        assert wait_status(alice, secret, TERMINAL)["status"] == "completed"
        (data / "shared").mkdir()
        backups = []
        for target in (data, data / "shared" / "nightly.jsonl"):  # a directory: a dated name
            run = subprocess.run(
                [sys.executable, "-m", "gembatch", "db", "backup", str(target),
                 "--db", svc.db_url],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
            backups.append(run.stdout.split()[1])  # "wrote PATH (...)"
        names = [Path(path).relative_to(data).as_posix() for path in backups]
        assert names[0].startswith("ledger-") and names[1] == "shared/nightly.jsonl", names
        for path in names:
            detail = _refused(bob, path)
            assert "one of the service's own files" in detail and "backup" in detail, detail
            assert "alice" not in detail, detail
        assert bob.get("/api/jobs").json()["jobs"] == []
