"""Numbered schema migrations for the SQL ledger, and the schema they lead to.

Why: a service database outlives the gembatch release that created it. Each migration is
a numbered function run in its own transaction, and `meta.schema_version` records the last
one applied. Opening a database at version N applies N+1 up to `LATEST` in order. A
database newer than the code is refused with a clear message: an old gembatch writing to
a schema it does not know could lose data.

Migrations freeze the DDL of their own day; the `Table` objects at the end of this module
describe the schema after the last migration and are what the queries in `sql.py` use
(a test checks that the two agree).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gembatch.errors import UserError
from gembatch.ledger import batch_names

SCHEMA_VERSION_KEY = "schema_version"
RESTORE_GENERATION_KEY = "restore_generation"


class SchemaTooNewError(UserError):
    """The database was written by a newer gembatch."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    up: Callable[[Connection], None]


# A 64-bit id on PostgreSQL; on SQLite it must be exactly INTEGER to alias the rowid (and
# so to take AUTOINCREMENT, which never reuses the id of a deleted row: the event cursor of
# the SSE dispatcher relies on that).
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# -- migration 1: the initial schema ------------------------------------------------------


def _m1_initial(conn: Connection) -> None:
    meta = sa.MetaData()
    sa.Table(
        "jobs",
        meta,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("finished_at", sa.Text, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Index("ix_jobs_status_priority_created", "status", "priority", "created_at"),
        sa.Index("ix_jobs_user_created", "user_id", "created_at"),
        sa.Index("ix_jobs_finished", "finished_at"),
    )
    sa.Table(
        "tasks",
        meta,
        sa.Column(
            "job_id",
            sa.Text,
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("state", sa.Text, nullable=True),
        sa.Column("display_name", sa.Text, nullable=True),
        sa.Column("batch_name", sa.Text, nullable=True),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Index("ix_tasks_batch_name", "batch_name"),
        sa.Index("ix_tasks_display_name", "display_name"),
    )
    sa.Table(
        "job_events",
        meta,
        sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),  # no FK: deleted with the job, by hand
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "audit",
        meta,
        sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=True),
        sa.Column("detail", sa.JSON, nullable=True),
        sa.Index("ix_audit_job", "job_id", "id"),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "deliveries",
        meta,
        sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("url", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, nullable=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_at", sa.Float, nullable=False),
        sa.Column("delivered_at", sa.Text, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Index("ix_deliveries_due", "delivered_at", "next_at"),
    )
    sa.Table(
        "meta",
        meta,
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    meta.create_all(conn)


# -- migration 2: lookup columns -----------------------------------------------------------


def _m2_lookup_columns(conn: Connection) -> None:
    """`find_by_input` and `find_by_batch` by index instead of reading every record, and
    newest-first listing by index. Existing rows are filled in from their records."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN input_file TEXT"))
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN batch_name TEXT"))
    conn.execute(sa.text("CREATE INDEX ix_jobs_input_file ON jobs (input_file)"))
    conn.execute(sa.text("CREATE INDEX ix_jobs_batch_name ON jobs (batch_name)"))
    conn.execute(sa.text("CREATE INDEX ix_jobs_created ON jobs (created_at)"))
    # Lightweight constructs frozen to this migration's view of the table.
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Text),
        sa.column("record", sa.JSON),
        sa.column("input_file", sa.Text),
        sa.column("batch_name", sa.Text),
    )
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.record)).all()
    updates = [
        {"key": job_id, "input_file": input_key(record), "batch_name": job_batch_name(record)}
        for job_id, record in rows
        if isinstance(record, dict)
    ]
    if updates:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == sa.bindparam("key"))
            .values(input_file=sa.bindparam("input_file"), batch_name=sa.bindparam("batch_name")),
            updates,
        )


# -- migration 3: claimable tasks by index ---------------------------------------------------


def _m3_task_due(conn: Connection) -> None:
    """Claims pick due tasks by index (`state`, `not_before`) instead of reading every
    active job: with 10,000 queued jobs a claim reads only the jobs it may take."""
    conn.execute(sa.text("ALTER TABLE tasks ADD COLUMN not_before FLOAT"))
    conn.execute(sa.text("CREATE INDEX ix_tasks_state_due ON tasks (state, not_before)"))
    tasks = sa.table(
        "tasks",
        sa.column("job_id", sa.Text),
        sa.column("idx", sa.Integer),
        sa.column("record", sa.JSON),
        sa.column("not_before", sa.Float),
    )
    rows = conn.execute(sa.select(tasks.c.job_id, tasks.c.idx, tasks.c.record)).all()
    updates = [
        {"b_job": job_id, "b_idx": idx, "not_before": task_not_before(record)}
        for job_id, idx, record in rows
        if task_not_before(record) is not None
    ]
    if updates:
        conn.execute(
            tasks.update()
            .where(tasks.c.job_id == sa.bindparam("b_job"), tasks.c.idx == sa.bindparam("b_idx"))
            .values(not_before=sa.bindparam("not_before")),
            updates,
        )


# -- migration 4: the public status, kept with the job ---------------------------------------


def _m4_status_view(conn: Connection) -> None:
    """The job's public status object (JSON text), written with every change of the job,
    so that the status endpoint (polled by every browser) is one indexed read. Rows of
    older versions keep NULL there until they next change: readers then build it from
    the record, as before."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN view TEXT"))


# -- migration 5: paths relative to the data directory ----------------------------------------


def _m5_relative_paths(conn: Connection) -> None:
    """Records name their files relative to the service's data directory (the ledger
    resolves them against the one it is given), so a data directory can move. Records
    written before held absolute paths (and, with a data directory given as a relative
    path, results paths relative to the service's working directory); where the data
    directory was is read from each record's own input, `<data dir>/inputs/<id>.jsonl`
    (`gembatch.ledger.paths.relative_to_old_root`). Records not in that layout are kept.
    A converted job's stored status view is dropped (readers rebuild it from the record):
    its messages may have named the old place."""
    from gembatch.ledger.paths import relative_to_old_root

    jobs = sa.table(
        "jobs", sa.column("id", sa.Text), sa.column("record", sa.JSON), sa.column("view", sa.Text)
    )
    tasks = sa.table(
        "tasks", sa.column("job_id", sa.Text), sa.column("idx", sa.Integer),
        sa.column("record", sa.JSON),
    )  # fmt: skip
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.record).order_by(jobs.c.id)).all()
    job_updates, task_updates = [], []
    for start in range(0, len(rows), 500):
        chunk = [(job_id, record) for job_id, record in rows[start : start + 500]]
        found: dict[str, list[tuple[int, Any]]] = {}
        task_rows = conn.execute(
            sa.select(tasks.c.job_id, tasks.c.idx, tasks.c.record)
            .where(tasks.c.job_id.in_([job_id for job_id, _ in chunk]))
            .order_by(tasks.c.job_id, tasks.c.idx)
        )
        for job_id, idx, task in task_rows:
            found.setdefault(job_id, []).append((idx, task))
        for job_id, record in chunk:
            if not isinstance(record, dict):
                continue
            old_tasks = found.get(job_id, [])
            converted = relative_to_old_root(record, [task for _, task in old_tasks])
            if converted is None:
                continue
            new_record, new_tasks = converted
            job_updates.append({"b_id": job_id, "record": new_record, "view": None})
            for (idx, old), new in zip(old_tasks, new_tasks, strict=True):
                if new != old:
                    task_updates.append({"b_job": job_id, "b_idx": idx, "record": new})
    if job_updates:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == sa.bindparam("b_id"))
            .values(record=sa.bindparam("record"), view=sa.bindparam("view")),
            job_updates,
        )
    if task_updates:
        conn.execute(
            tasks.update()
            .where(tasks.c.job_id == sa.bindparam("b_job"), tasks.c.idx == sa.bindparam("b_idx"))
            .values(record=sa.bindparam("record")),
            task_updates,
        )


def task_not_before(task: Any) -> float | None:
    value = task.get("not_before") if isinstance(task, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def input_key(record: dict[str, Any]) -> str | None:
    """The indexed form of `input_file`: `./a.jsonl` and `a.jsonl` are the same input
    (`same_input_file` holds exactly when the keys are equal)."""
    value = record.get("input_file")
    return os.path.normpath(value) if isinstance(value, str) else None


def job_batch_name(record: dict[str, Any]) -> str | None:
    """The job-level batch name (`batch.name`, or a v0.1.0 record's `job_name`); the
    names inside tasks live in `tasks.batch_name`."""
    top = {key: value for key, value in record.items() if key != "tasks"}
    return next(batch_names(top), None)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _m1_initial),
    Migration(2, "jobs.input_file and jobs.batch_name lookup columns", _m2_lookup_columns),
    Migration(3, "tasks.not_before: claims by index", _m3_task_due),
    Migration(4, "jobs.view: the public status, for one-read status calls", _m4_status_view),
    Migration(5, "paths in records relative to the data directory", _m5_relative_paths),
)
LATEST = MIGRATIONS[-1].version


# -- running them -------------------------------------------------------------------------

_META = sa.table("meta", sa.column("key", sa.Text), sa.column("value", sa.Text))


def read_version(conn: Connection) -> int:
    """The schema version of the database (0: empty, nothing applied yet)."""
    if not sa.inspect(conn).has_table("meta"):
        return 0
    value = conn.execute(
        sa.select(_META.c.value).where(_META.c.key == SCHEMA_VERSION_KEY)
    ).scalar_one_or_none()
    return int(value) if value is not None else 0


def check_supported(version: int, where: str) -> None:
    if version > LATEST:
        raise SchemaTooNewError(
            f"this gembatch knows schema version {LATEST}, the database {where} is at "
            f"{version}: upgrade gembatch (a newer release wrote this database)"
        )


def apply_migration(conn: Connection, migration: Migration, where: str = "") -> bool:
    """Apply `migration` inside the caller's write transaction unless the database is
    already there (another process may have migrated it meanwhile); True if applied."""
    if conn.dialect.name == "postgresql":
        # Serialise concurrent openers: PostgreSQL has no database-wide write lock.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('gembatch.migrations'))"))
    version = read_version(conn)
    check_supported(version, where)
    if version >= migration.version:
        return False
    if version != migration.version - 1:
        raise RuntimeError(f"migration {migration.version} needs version {migration.version - 1}")
    migration.up(conn)
    _set_version(conn, migration.version)
    return True


def pending(version: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > version]


def _set_version(conn: Connection, version: int) -> None:
    updated = conn.execute(
        _META.update().where(_META.c.key == SCHEMA_VERSION_KEY).values(value=str(version))
    ).rowcount
    if not updated:
        conn.execute(_META.insert().values(key=SCHEMA_VERSION_KEY, value=str(version)))


# -- the schema after the last migration (used by the queries) -----------------------------

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Column("finished_at", sa.Text),
    sa.Column("last_seq", sa.Integer, nullable=False),
    sa.Column("record", sa.JSON, nullable=False),
    sa.Column("input_file", sa.Text),  # migration 2
    sa.Column("batch_name", sa.Text),  # migration 2
    sa.Column("view", sa.Text),  # migration 4
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.Text),
    sa.Column("display_name", sa.Text),
    sa.Column("batch_name", sa.Text),
    sa.Column("record", sa.JSON, nullable=False),
    sa.Column("not_before", sa.Float),  # migration 3
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("job_id", sa.Text),
    sa.Column("detail", sa.JSON),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("url", sa.Text, primary_key=True),
    sa.Column("job_id", sa.Text),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Text),
    sa.Column("last_error", sa.Text),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


__all__ = [
    "LATEST",
    "MIGRATIONS",
    "RESTORE_GENERATION_KEY",
    "SCHEMA_VERSION_KEY",
    "Migration",
    "SchemaTooNewError",
    "apply_migration",
    "audit",
    "check_supported",
    "deliveries",
    "input_key",
    "job_batch_name",
    "job_events",
    "jobs",
    "meta",
    "metadata",
    "pending",
    "read_version",
    "task_not_before",
    "tasks",
]
