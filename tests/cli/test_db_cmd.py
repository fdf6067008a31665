"""`gembatch db backup` / `gembatch db restore`, run as real processes on real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import filelock
import pytest

from gembatch.engine import reducers
from gembatch.jobs import RetryConfig


def gembatch(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gembatch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def new_record(job_id: str) -> dict[str, Any]:
    """A pending job as the service stores it: its files named inside the data directory."""
    job = reducers.new_job(
        job_id=job_id,
        input_file=f"{job_id}.jsonl",
        input_path=f"inputs/{job_id}.jsonl",
        sha256="0" * 64,
        size_bytes=10,
        count=1,
        plans=[(0, 1, 1)],
        model="gemini-2.5-flash-lite",
        priority=0,
        retry_config=RetryConfig(),
        max_parallel_tasks=None,
        result_file=f"results/{job_id}.jsonl",
        now=time.time(),
    )
    return job.to_record()


def open_ledger(path: Path, events: bool = False) -> Any:
    from gembatch.ledger.sql import SqlLedger
    from gembatch.server.events import events_for

    return SqlLedger(f"sqlite:///{path}", on_change=events_for if events else None)


def close(ledger: Any) -> None:
    method = getattr(ledger, "close", None)
    if callable(method):
        method()


def job_ids(path: Path) -> set[str]:
    ledger = open_ledger(path)
    try:
        return {r["id"] for r in ledger.list_jobs(limit=100_000)}
    finally:
        close(ledger)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A service database with two pending jobs, and its data directory with their
    inputs where `gembatch serve` and `gembatch db` look by default (`gembatch-data`)."""
    path = tmp_path / "gembatch.db"
    ledger = open_ledger(path, events=True)
    ledger.add_many([new_record("jold1"), new_record("jold2")])
    close(ledger)
    inputs = tmp_path / "gembatch-data" / "inputs"
    inputs.mkdir(parents=True)
    for job_id in ("jold1", "jold2"):
        (inputs / f"{job_id}.jsonl").write_text('{"key": "k", "request": {}}\n')
    return path


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from tests.cli.test_db_cmd import new_record, open_ledger
    ledger = open_ledger(Path({db!r}))
    stop = Path({stop!r})
    n = 0
    while not stop.exists():
        ledger.add_many([new_record(f"w{{n}}-{{i}}") for i in range(5)])
        n += 1
    print(n)
    """
)


def test_backup_while_another_process_writes_is_consistent(tmp_path: Path, db: Path) -> None:
    stop = tmp_path / "stop"
    script = WRITER.format(tests=str(Path(__file__).parents[2]), db=str(db), stop=str(stop))
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(job_ids(db)) < 50:
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        backups = [tmp_path / f"b{i}.db" for i in range(3)]
        for target in backups:
            result = gembatch(tmp_path, "db", "backup", str(target), "--db", f"sqlite:///{db}")
            assert result.returncode == 0, result.stderr
            assert str(target) in result.stdout and "jobs" in result.stdout
            assert "schema version" in result.stdout
    finally:
        stop.touch()
        _out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    counts = []
    for target in backups:
        with sqlite3.connect(target) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = job_ids(target)
        assert {"jold1", "jold2"} <= ids
        # Every batch of 5 is one transaction: a consistent copy holds whole batches.
        assert (len(ids) - 2) % 5 == 0
        counts.append(len(ids))
    assert counts == sorted(counts) and counts[-1] > 2
    assert len(job_ids(db)) >= counts[-1]
    assert not list(tmp_path.glob(".b*.tmp")), "no temporary files left behind"


def test_backup_refuses_to_overwrite_without_force(tmp_path: Path, db: Path) -> None:
    target = tmp_path / "backup.db"
    target.write_text("precious")
    result = gembatch(tmp_path, "db", "backup", str(target), "--db", f"sqlite:///{db}")
    assert_user_error(result, "exists", "--force")
    assert target.read_text() == "precious"
    result = gembatch(tmp_path, "db", "backup", str(target), "--db", f"sqlite:///{db}", "--force")
    assert result.returncode == 0, result.stderr
    assert job_ids(target) == {"jold1", "jold2"}


def test_backup_uses_the_default_database_of_gembatch_serve(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path / "gembatch.db")
    ledger.add_many([new_record("jdefault")])
    close(ledger)
    result = gembatch(tmp_path, "db", "backup", "copy.db")
    assert result.returncode == 0, result.stderr
    assert "1 jobs" in result.stdout
    assert job_ids(tmp_path / "copy.db") == {"jdefault"}


def test_backup_of_a_file_that_is_not_a_database_says_so(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    result = gembatch(tmp_path, "db", "backup", "copy.db", "--db", "sqlite:///notes.db")
    assert_user_error(result, "cannot back up notes.db", "not a database")
    assert not (tmp_path / "copy.db").exists()


def test_backup_of_another_programs_database_leaves_it_alone(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text)")
    before = other.read_bytes()
    result = gembatch(tmp_path, "db", "backup", "copy.db", "--db", "sqlite:///other.db")
    assert_user_error(result, "not a gembatch service database")
    assert other.read_bytes() == before
    assert not (tmp_path / "copy.db").exists()


def test_backup_of_a_missing_database_says_so(tmp_path: Path) -> None:
    result = gembatch(tmp_path, "db", "backup", "copy.db", "--db", "sqlite:///nothing.db")
    assert_user_error(result, "no database at nothing.db")
    assert not (tmp_path / "nothing.db").exists() and not (tmp_path / "copy.db").exists()


def test_restore_brings_back_the_backup_keeps_the_old_file_and_bumps_the_generation(
    tmp_path: Path, db: Path
) -> None:
    backup = tmp_path / "backup.db"
    assert (
        gembatch(tmp_path, "db", "backup", str(backup), "--db", f"sqlite:///{db}").returncode == 0
    )
    ledger = open_ledger(db, events=True)
    before = ledger.restore_generation()
    ledger.add_many([new_record("jnew")])
    last_sent = ledger.events_since(0)[-1].id
    close(ledger)

    result = gembatch(tmp_path, "db", "restore", str(backup), "--db", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    assert "gembatch serve" in result.stdout
    assert job_ids(db) == {"jold1", "jold2"}
    [kept] = tmp_path.glob("gembatch.db.before-restore-*")
    assert str(kept) in result.stdout
    assert job_ids(kept) == {"jold1", "jold2", "jnew"}
    ledger = open_ledger(db, events=True)
    try:
        assert ledger.restore_generation() == before + 1
        # Event ids handed out before the restore (SSE ids, webhook ids) are not reused.
        ledger.add_many([new_record("jafter")])
        assert ledger.events_since(0)[-1].id > last_sent
    finally:
        close(ledger)
    assert job_ids(backup) == {"jold1", "jold2"}, "the backup itself is left as it was"
    # Restoring again moves the generation on again (never back to the backup's).
    result = gembatch(tmp_path, "db", "restore", str(backup), "--db", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    ledger = open_ledger(db)
    try:
        assert ledger.restore_generation() == before + 2
    finally:
        close(ledger)
    assert len(list(tmp_path.glob("gembatch.db.before-restore-*"))) == 2
    assert not list(tmp_path.glob(".gembatch.db.*")), "no temporary files left behind"
    for suffix in ("-wal", "-shm"):
        assert not (tmp_path / f"gembatch.db{suffix}").exists() or (
            (tmp_path / f"gembatch.db{suffix}").stat().st_size == 0
        )


def test_restore_into_a_missing_database_creates_it(tmp_path: Path, db: Path) -> None:
    target = tmp_path / "fresh" / "service.db"
    target.parent.mkdir()
    result = gembatch(tmp_path, "db", "restore", str(db), "--db", f"sqlite:///{target}")
    assert result.returncode == 0, result.stderr
    assert job_ids(target) == {"jold1", "jold2"}
    assert not list(target.parent.glob("*.before-restore-*"))
    assert "kept" not in result.stdout


def test_restore_is_refused_while_a_server_holds_the_database(tmp_path: Path, db: Path) -> None:
    backup = tmp_path / "backup.db"
    assert (
        gembatch(tmp_path, "db", "backup", str(backup), "--db", f"sqlite:///{db}").returncode == 0
    )
    ledger = open_ledger(db)
    ledger.add_many([new_record("jnew")])
    close(ledger)
    with filelock.FileLock(f"{db}.server.lock"):
        result = gembatch(tmp_path, "db", "restore", str(backup), "--db", f"sqlite:///{db}")
    assert_user_error(result, "server is running", "stop")
    assert job_ids(db) == {"jold1", "jold2", "jnew"}
    assert not list(tmp_path.glob("gembatch.db.before-restore-*"))
    # Once the server is gone, the same command works.
    result = gembatch(tmp_path, "db", "restore", str(backup), "--db", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr


def test_restore_names_what_the_data_directory_lacks_and_goes_on_only_if_allowed(
    tmp_path: Path, db: Path
) -> None:
    backup = tmp_path / "backup.db"
    assert (
        gembatch(tmp_path, "db", "backup", str(backup), "--db", f"sqlite:///{db}").returncode == 0
    )
    (tmp_path / "gembatch-data" / "inputs" / "jold2.jsonl").unlink()
    target = tmp_path / "site" / "gembatch.db"
    target.parent.mkdir()
    restore = ("db", "restore", str(backup), "--db", f"sqlite:///{target}")
    result = gembatch(tmp_path, *restore)
    assert_user_error(
        result,
        f"{backup} names 1 file that the data directory gembatch-data lacks:\n"
        "  job jold2 (pending): inputs/jold2.jsonl (input of task 0)\n",
        "A restore needs the database and the data directory backed up with it",
        "--allow-missing",
        f"{target} is unchanged",
    )
    assert "jold1" not in result.stderr
    assert not target.exists()
    assert not list(target.parent.glob(".gembatch.db.*")), "no temporary files left behind"

    result = gembatch(tmp_path, *restore, "--allow-missing")
    assert result.returncode == 0, result.stderr
    assert "warning: restored without 1 file the jobs need" in result.stderr
    assert "job jold2 (pending): inputs/jold2.jsonl" in result.stderr
    assert job_ids(target) == {"jold1", "jold2"}


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "not-gembatch", "newer-schema", "missing", "directory"]
)
def test_restore_refuses_a_bad_backup_and_changes_nothing(
    tmp_path: Path, db: Path, kind: str
) -> None:
    bad = tmp_path / "bad.db"
    if kind == "garbage":
        bad.write_bytes(b"this is not a database\n" * 200)
    elif kind == "truncated":
        assert (
            gembatch(tmp_path, "db", "backup", str(bad), "--db", f"sqlite:///{db}").returncode == 0
        )
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "not-gembatch":
        with sqlite3.connect(bad) as conn:
            conn.execute("CREATE TABLE other (x)")
    elif kind == "newer-schema":
        assert (
            gembatch(tmp_path, "db", "backup", str(bad), "--db", f"sqlite:///{db}").returncode == 0
        )
        with sqlite3.connect(bad) as conn:
            conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    elif kind == "directory":
        bad.mkdir()
    before = db.read_bytes()
    result = gembatch(tmp_path, "db", "restore", str(bad), "--db", f"sqlite:///{db}")
    assert_user_error(result, str(bad))
    assert db.read_bytes() == before
    assert job_ids(db) == {"jold1", "jold2"}
    assert not list(tmp_path.glob("gembatch.db.before-restore-*"))
    assert not list(tmp_path.glob(".gembatch.db.*")), "no temporary files left behind"


def test_restore_refuses_a_corrupted_page(tmp_path: Path, db: Path) -> None:
    """A file that opens but fails integrity_check (an index page overwritten)."""
    bad = tmp_path / "bad.db"
    assert gembatch(tmp_path, "db", "backup", str(bad), "--db", f"sqlite:///{db}").returncode == 0
    with sqlite3.connect(bad) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    data = bytearray(bad.read_bytes())
    for page in range(1, pages):  # every page but the first (the schema)
        start = page * page_size + 8
        data[start : start + 64] = b"\xff" * 64
    bad.write_bytes(bytes(data))
    result = gembatch(tmp_path, "db", "restore", str(bad), "--db", f"sqlite:///{db}")
    assert_user_error(result, str(bad))
    assert job_ids(db) == {"jold1", "jold2"}


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_postgresql_url_points_to_pg_dump(tmp_path: Path, command: str) -> None:
    (tmp_path / "x.db").write_text("")
    url = "postgresql+psycopg://gembatch:secret@db.example/gembatch"
    result = gembatch(tmp_path, "db", command, "x.db", "--db", url)
    assert_user_error(result, "pg_dump", "README")
    assert "secret" not in result.stderr


def test_a_url_that_is_not_a_url_is_explained(tmp_path: Path) -> None:
    result = gembatch(tmp_path, "db", "backup", "x.db", "--db", "gembatch.db")
    assert_user_error(result, "sqlite:///")
