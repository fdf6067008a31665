"""`gembatch db backup PATH`, `gembatch db restore PATH`, `gembatch db check`.

Why: the service's ledger is one SQLite file that a running server writes all the time;
copying it with `cp` can catch it half-written, and putting an old copy back blindly
would make the server repeat (and pay for) work already done. Backup takes SQLite's
consistent online copy, checked with integrity_check. Restore refuses while a server
holds the database, keeps the replaced file, swaps the backup in atomically and bumps the
restore generation, so every claim recorded in the backup is treated as foreign and
reconciled with Gemini instead of repeated (reference/job-systems.md §3.10).
A database is half of a site: its jobs' inputs and results live in the data directory,
which the records name relative to it. Restore (and `check`, for any database, e.g.
after `pg_restore`) says which files the jobs need that the data directory lacks,
before the service would fail those jobs one by one.
PostgreSQL has its own tools (pg_dump / pg_restore): see the README.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import filelock
import typer

from gembatch.cli.app import Typer, app
from gembatch.errors import UserError
from gembatch.fsutil import fsync_dir
from gembatch.units import format_size

if TYPE_CHECKING:
    from gembatch.ledger.sql import SqlLedger

DEFAULT_DB = "sqlite:///gembatch.db"
SERVER_LOCK_SUFFIX = ".server.lock"
SIDE_FILES = ("-wal", "-shm", "-journal")

db_app = Typer(
    name="db",
    help="Back up, restore and check the service's database (`gembatch serve --db`).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")

DB_OPTION = typer.Option(
    DEFAULT_DB,
    "--db",
    metavar="URL",
    help="The service's database URL (as given to `gembatch serve`).",
)
DEFAULT_DATA_DIR = Path("gembatch-data")
DATA_DIR_OPTION = typer.Option(
    DEFAULT_DATA_DIR,
    "--data-dir",
    metavar="DIR",
    help="The service's data directory (as given to `gembatch serve`): it must hold the "
    "files the database's jobs need.",
)
MAX_LISTED = 10


@db_app.command()
def backup(
    path: Path = typer.Argument(
        ..., metavar="PATH", help="Where to write the copy (a file, or a directory)."
    ),
    db: str = DB_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite PATH if it exists."),
) -> None:
    """Write a consistent copy of the database, safe while the server is running.

    The copy is SQLite's online backup, checked with integrity_check, written to a
    temporary file beside PATH and renamed into place: PATH is never half-written.
    """
    source = sqlite_path(db)
    if not source.is_file():
        raise UserError(f"no database at {source}: nothing to back up (check --db)")
    if path.is_dir():
        path = path / f"{source.stem}-{_timestamp()}{source.suffix or '.db'}"
    if path.exists() and not force:
        raise UserError(f"{path} exists; give another path, or --force to overwrite it")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory; create it first")
    if _same_file(path, source):
        raise UserError(f"{path} is the database itself; give another path")
    _check_source(source)

    from sqlalchemy.exc import SQLAlchemyError

    from gembatch.ledger.sql import SqlLedger

    try:
        with SqlLedger(db) as ledger:
            # SQLite's online backup into a temporary file beside PATH, integrity_check,
            # then renamed into place.
            ledger.backup(path)
    except UserError:
        raise
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        raise UserError(
            f"cannot back up {source}: {_reason(exc)}; check that --db names the service's "
            "database and that the disk has room"
        ) from None
    info = describe(path)
    typer.echo(
        f"wrote {path} ({format_size(path.stat().st_size)}): {info.jobs} jobs, "
        f"schema version {info.schema_version}, restore generation {info.generation}"
    )


@db_app.command()
def restore(
    path: Path = typer.Argument(
        ..., metavar="FILE", help="A backup written by `gembatch db backup`."
    ),
    db: str = DB_OPTION,
    data_dir: Path = DATA_DIR_OPTION,
    allow_missing: bool = typer.Option(
        False,
        "--allow-missing",
        help="Restore even if the data directory lacks files the jobs need (those jobs fail).",
    ),
) -> None:
    """Put a backup in place of the database (the server must be stopped).

    The backup is checked (it opens, passes integrity_check, is a gembatch database, and
    the data directory holds every file its jobs need: inputs of unfinished jobs, results
    of completed ones); the current database is kept as DB.before-restore-TIMESTAMP; the
    swap is atomic; and the restore generation is bumped, so the next `gembatch serve`
    reconciles every job that was in flight with Gemini instead of repeating its work.
    """
    target = sqlite_path(db)
    if not path.exists():
        raise UserError(f"no backup at {path}: give the file `gembatch db backup` wrote")
    if not path.is_file():
        raise UserError(f"{path} is not a file: give the file `gembatch db backup` wrote")
    if _same_file(path, target):
        raise UserError(f"{path} is the database itself; give a backup file")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent} is not a directory; create it first")

    lock = filelock.FileLock(server_lock_path(target), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(
            f"a server is running on {target} (it holds {server_lock_path(target)}); "
            "stop `gembatch serve` first, then restore"
        ) from None
    try:
        kept, info, missing = _restore_locked(path, target, data_dir, allow_missing)
    finally:
        lock.release()
    if kept is not None:
        typer.echo(f"kept the replaced database as {kept}")
    if missing:
        typer.echo(
            f"warning: restored without {_files(len(missing))} the jobs need "
            f"(--allow-missing); those jobs will fail:\n{_listing(missing)}",
            err=True,
        )
    else:
        typer.echo(f"{data_dir} holds every file the restored jobs need")
    typer.echo(
        f"restored {path} to {target}: {info.jobs} jobs, schema version {info.schema_version}, "
        f"restore generation now {info.generation}"
    )
    typer.echo(
        "next: start the server with `gembatch serve"
        + ("" if db == DEFAULT_DB else f" --db {db}")
        + ("" if data_dir == DEFAULT_DATA_DIR else f" --data-dir {data_dir}")
        + "`; jobs that were in flight are reconciled with Gemini, not repeated"
    )


@db_app.command()
def check(db: str = DB_OPTION, data_dir: Path = DATA_DIR_OPTION) -> None:
    """Check that the data directory holds every file the database's jobs need.

    For SQLite and PostgreSQL: after a move of the data directory, or a `pg_restore`,
    before starting `gembatch serve`. Lists what is missing (inputs of unfinished jobs,
    results of completed ones) and exits 1; exits 0 when nothing is.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from gembatch.ledger.sql import SqlLedger

    if _is_sqlite(db):
        source = sqlite_path(db)
        if not source.is_file():
            raise UserError(f"no database at {source}: nothing to check (check --db)")
        _check_source(source)
    else:
        _check_server_database(db)
    try:
        with SqlLedger(db, data_dir=data_dir) as ledger:
            jobs, missing = missing_files(ledger)
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        raise UserError(f"cannot read the database {db}: {_reason(exc)}; check --db") from None
    if missing:
        raise UserError(
            f"{_lacks(data_dir, 'the database', missing)}\nPut the data directory that belongs "
            f"with this database at {data_dir}, or give --data-dir",
            exit_code=1,
        )
    typer.echo(f"{data_dir} holds every file the database's {jobs} jobs need")


# -- what a database needs of its data directory ---------------------------------------------


@dataclass(frozen=True)
class MissingFile:
    job_id: str
    status: str
    path: str  # as the record names it: relative to the data directory
    what: str


def missing_files(ledger: SqlLedger) -> tuple[int, list[MissingFile]]:
    """(jobs, the files they need that are not there): the inputs of unfinished jobs'
    unfinished tasks, verified results not merged yet, and completed jobs' results.
    `ledger` is a SqlLedger given the data directory."""
    from gembatch.jobs import Job, JobStatus

    missing: list[MissingFile] = []
    count, offset, page = 0, 0, 1000
    while True:
        records = ledger.list_jobs(None, None, page, offset)
        offset += len(records)
        for record in records:
            count += 1
            try:
                job = Job.from_record(record)
            except (KeyError, ValueError, TypeError):
                continue
            needed: list[tuple[str, str]] = []
            if job.status is JobStatus.COMPLETED and job.result_file:
                needed.append((job.result_file, "its results"))
            if not job.status.terminal:
                for task in job.tasks:
                    if not task.state.terminal:
                        needed.append((task.input.path, f"input of task {task.index}"))
                    if task.part_file and not task.extra.get("merged"):
                        needed.append((task.part_file, f"verified results of task {task.index}"))
            seen: set[str] = set()
            for path, what in needed:
                if path in seen or os.path.isfile(path):
                    continue
                seen.add(path)
                shown = ledger.paths.relative(path) if ledger.paths is not None else path
                missing.append(MissingFile(job.id, job.status.value, shown, what))
        if len(records) < page:
            return count, missing


def _lacks(data_dir: Path, label: str, missing: list[MissingFile]) -> str:
    where = f"the data directory {data_dir}"
    if not data_dir.is_dir():
        where += " (it does not exist)"
    return f"{label} names {_files(len(missing))} that {where} lacks:\n{_listing(missing)}"


def _files(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"


def _listing(missing: list[MissingFile]) -> str:
    lines = [f"  job {m.job_id} ({m.status}): {m.path} ({m.what})" for m in missing[:MAX_LISTED]]
    if len(missing) > MAX_LISTED:
        lines.append(f"  ... and {len(missing) - MAX_LISTED} more")
    return "\n".join(lines)


def _restore_locked(
    backup_file: Path, target: Path, data_dir: Path, allow_missing: bool
) -> tuple[Path | None, DbInfo, list[MissingFile]]:
    from sqlalchemy.exc import SQLAlchemyError

    temp = _temp_path(target.parent, target.name)
    try:
        # 1. A private copy of the backup (and its WAL, if it has one), checked.
        shutil.copyfile(backup_file, temp)
        wal = _side(backup_file, "-wal")
        if wal.exists():
            shutil.copyfile(wal, _side(temp, "-wal"))
        check_database(temp, label=str(backup_file))
        # 2. What the replaced database had reached (its WAL folded in first, when it
        #    opens): generations and ids only move forward across a restore.
        generation, sequences = _replaced_state(target)
        # 3. Bump the restore generation in the copy, before it becomes the database.
        from gembatch.ledger.migrations import RESTORE_GENERATION_KEY
        from gembatch.ledger.sql import SqlLedger

        with SqlLedger(_sqlite_url(temp), data_dir=data_dir) as ledger:
            # The database and the data directory backed up with it make a site: a
            # database alone would fail every job whose files it names.
            _, missing = missing_files(ledger)
            if missing and not allow_missing:
                raise UserError(
                    f"{_lacks(data_dir, str(backup_file), missing)}\nA restore needs the "
                    "database and the data directory backed up with it: put that directory "
                    f"at {data_dir} (or give --data-dir), then restore again; or add "
                    f"--allow-missing to restore anyway (those jobs then fail). {target} is "
                    "unchanged"
                )
            if generation > ledger.restore_generation():
                ledger.meta_set(RESTORE_GENERATION_KEY, str(generation))
            ledger.bump_restore_generation()
        # Event ids already sent out (SSE ids, webhook X-Gembatch-Event-Id) are never
        # issued again for different events: new ids continue above the replaced ones.
        _raise_sequences(temp, sequences)
        _checkpoint(temp)
        _fsync_file(temp)
        # 4. Keep the current database, then swap the copy in.
        kept = _keep_current(target) if target.exists() else None
        for suffix in SIDE_FILES:
            _remove(_side(target, suffix))
        os.replace(temp, target)
        fsync_dir(target.parent)
    except UserError:
        raise
    except (OSError, sqlite3.Error, SQLAlchemyError) as exc:
        raise UserError(
            f"restore of {backup_file} failed, {target} is unchanged: {_reason(exc)}"
        ) from None
    finally:
        for name in (temp, *(_side(temp, s) for s in (*SIDE_FILES, ".write.lock"))):
            _remove(name)
    return kept, describe(target), missing


def _keep_current(target: Path) -> Path:
    """The current database, kept as `<db>.before-restore-<timestamp>` (its WAL was folded
    in by `_replaced_state` when SQLite could; otherwise the WAL is kept beside it)."""
    kept = target.with_name(f"{target.name}.before-restore-{_timestamp()}")
    n = 1
    while kept.exists():
        n += 1
        kept = target.with_name(f"{target.name}.before-restore-{_timestamp()}-{n}")
    try:
        os.link(target, kept)
    except OSError:
        shutil.copy2(target, kept)
        _fsync_file(kept)
    wal = _side(target, "-wal")
    if wal.exists() and wal.stat().st_size:  # not folded in: keep it with its database
        shutil.copyfile(wal, _side(kept, "-wal"))
    fsync_dir(target.parent)
    return kept


# -- checking and describing a database file ----------------------------------------------


@dataclass(frozen=True)
class DbInfo:
    jobs: int
    schema_version: str
    generation: int


def check_database(path: Path, *, label: str) -> None:
    """The file opens as SQLite, passes integrity_check and holds gembatch's tables."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"{label} is not a usable SQLite database ({_reason(exc)}); give a file "
            "written by `gembatch db backup`"
        ) from None
    problems = [str(r[0]) for r in rows]
    if problems != ["ok"]:
        shown = "; ".join(problems[:3])
        raise UserError(
            f"{label} fails SQLite's integrity check ({shown}); it cannot be restored. "
            "Use another backup"
        )
    if not {"jobs", "meta"} <= tables:
        raise UserError(
            f"{label} is an SQLite database but not gembatch's (no jobs/meta tables); "
            "give a file written by `gembatch db backup`"
        )
    from gembatch.ledger.migrations import LATEST

    version = describe(path).schema_version
    if version.isdigit() and int(version) > LATEST:
        raise UserError(
            f"{label} was written by a newer gembatch (schema version {version}; this one "
            f"knows {LATEST}): upgrade gembatch, then restore"
        )


def _check_source(source: Path) -> None:
    """Before the ledger opens it (and would add its tables to any SQLite file): the
    database to back up is gembatch's. A plain connection that only reads, so a live
    server's WAL is honoured and no -wal/-shm files are left behind."""
    try:
        with contextlib.closing(sqlite3.connect(source, timeout=10)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise UserError(
            f"cannot back up {source}: {_reason(exc)}; check that --db names the service's database"
        ) from None
    if not {"jobs", "meta"} <= tables:
        raise UserError(
            f"{source} is not a gembatch service database (no jobs/meta tables); check --db"
        )


def _replaced_state(target: Path) -> tuple[int, dict[str, int]]:
    """The restore generation and the AUTOINCREMENT high-water marks (event and audit
    ids) of the database about to be replaced; nothing if it is missing or unreadable."""
    if not target.is_file():
        return 0, {}
    try:
        _checkpoint(target)
    except sqlite3.Error:
        pass  # read what the main file holds
    try:
        generation = describe(target).generation
    except sqlite3.Error:
        generation = 0
    try:
        with contextlib.closing(sqlite3.connect(_read_only_uri(target), uri=True)) as conn:
            sequences = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    except sqlite3.Error:
        sequences = {}
    return generation, {str(k): int(v) for k, v in sequences.items() if isinstance(v, int)}


def _raise_sequences(path: Path, sequences: dict[str, int]) -> None:
    if not sequences:
        return
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for name, seq in sequences.items():
            updated = conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = ? AND seq < ?", (seq, name, seq)
            ).rowcount
            known = conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = ?", (name,)).fetchone()
            if not updated and not known:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, seq))


def _read_only_uri(path: Path) -> str:
    # immutable: a pure reader that leaves no -wal/-shm files beside a backup.
    return f"{path.resolve().as_uri()}?mode=ro&immutable=1"


def describe(path: Path) -> DbInfo:
    """Jobs, schema version and restore generation of a gembatch database (read-only)."""
    with contextlib.closing(sqlite3.connect(_read_only_uri(path), uri=True)) as c:
        jobs = int(c.execute("SELECT count(*) FROM jobs").fetchone()[0])
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
    try:
        generation = int(meta.get("restore_generation") or 0)
    except ValueError:
        generation = 0
    return DbInfo(jobs, str(meta.get("schema_version", "?")), generation)


# -- paths ---------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    """The file of a `sqlite:///path` URL; any other database gets the README's way."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"--db {url!r} is not a database URL; use sqlite:///PATH (e.g. {DEFAULT_DB})"
        ) from None
    if parsed.get_backend_name() != "sqlite":
        raise UserError(
            f"`gembatch db backup/restore` handles SQLite databases; {parsed.get_backend_name()} "
            "is backed up with its own tools: follow the README, section 'Backup and restore' "
            "(pg_dump -Fc to back up; to restore: stop every server, pg_restore --clean, then "
            "add 1 to meta.restore_generation)"
        )
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise UserError(f"--db {url!r} names no database file; use sqlite:///PATH")
    return Path(database)


def _is_sqlite(url: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).get_backend_name() == "sqlite"
    except ArgumentError:
        return True  # sqlite_path explains what a URL looks like


def _check_server_database(url: str) -> None:
    """A database server's (PostgreSQL): it answers, and holds gembatch's tables (the
    ledger would create them in any database it opens)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    from gembatch.ledger.sql import driver_url

    engine = sa.create_engine(driver_url(url))
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            found = inspector.has_table("jobs") and inspector.has_table("meta")
    except SQLAlchemyError as exc:
        raise UserError(f"cannot open the database {url}: {_reason(exc)}; check --db") from None
    finally:
        engine.dispose()
    if not found:
        raise UserError(
            f"{url} is not a gembatch service database (no jobs/meta tables); check --db"
        )


def server_lock_path(db_file: Path) -> str:
    """The kernel lock a running server holds on its database (`<db>.server.lock`)."""
    return f"{db_file}{SERVER_LOCK_SUFFIX}"


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _temp_path(directory: Path, name: str) -> Path:
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(temp)  # SQLite and the ledger create the file themselves
    return Path(temp)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


# -- I/O helpers -----------------------------------------------------------------------------


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the main file; the last connection closing removes the WAL."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _reason(exc: BaseException) -> str:
    exc = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__
