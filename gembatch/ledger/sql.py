"""The SQL ledger: the HTTP service's job record, on SQLite (one machine) or PostgreSQL.

Why: a service needs what one JSONL file cannot give: per-user queries over years of jobs,
an event log numbered per job for SSE replay, an audit log that outlives deleted jobs, a
webhook outbox, and many writers without a whole-file lock. Jobs and tasks are rows that
keep each record's JSON whole (unknown keys included). A change and the events it causes
commit in one short transaction, so an event exists iff its change does, and each job's
event numbers have no gaps. SQLite writes start with `BEGIN IMMEDIATE` (a deferred read
upgraded to a write can fail however long it waits) and a busy database is retried with
jittered backoff, so SQLITE_BUSY never reaches a caller.

The engine's part of the interface (`load`, `load_active`, `add`, `add_many`,
`update_many`, `apply`, `transact`, `find_by_*`) keeps the `Ledger` contract of
`gembatch.ledger` exactly as `JsonlLedger` does; the rest serves the HTTP service.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from gembatch import fsutil
from gembatch.jobs import (
    JOB_TRANSITIONS,
    TASK_LIVE,
    TASK_TERMINAL,
    TERMINAL_STATUSES,
    InvalidTransition,
    JobEvent,
    JobStatus,
    parse_time,
)
from gembatch.ledger import (
    LedgerFileError,
    LedgerSnapshot,
    Record,
    UnstorableRecord,
    batch_names,
    record_id,
)
from gembatch.ledger import migrations as m

# The JSONL ledger's own status guard: both ledgers refuse exactly the same changes.
from gembatch.ledger.jsonl import ApplyResult, _check_status_change, copy_record
from gembatch.ledger.paths import DataDir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_log = logging.getLogger(__name__)
T = TypeVar("T")
Change = Callable[[Record], Record | None]

TERMINAL = tuple(sorted(status.value for status in TERMINAL_STATUSES))
# From the transition table: which statuses `prune` may remove (the terminal ones) and
# which a job may not be deleted in without force (a remote batch may still be working).
PRUNABLE = tuple(sorted(s.value for s in JobStatus if (s, JobEvent.PRUNE) in JOB_TRANSITIONS))
_UNDELETABLE = frozenset(s.value for s in JobStatus if (s, JobEvent.DELETE) not in JOB_TRANSITIONS)

DEFAULT_BUSY_TIMEOUT = 10.0
BUSY_ATTEMPTS = 12  # each attempt already waited `busy_timeout` inside SQLite
_CHUNK = 500  # ids per `IN (...)`: far below every backend's parameter limit
_WRITE = "gembatch_write"  # connection option: this transaction writes
_INT_MAX = 2**31 - 1  # PostgreSQL INTEGER


class _EventLike(Protocol):
    type: str
    data: dict[str, Any]


OnChange = Callable[[Record | None, Record | None], Sequence[_EventLike]]
View = Callable[[Record], dict[str, Any]]


@dataclass(frozen=True)
class StoredEvent:
    """One row of a job's event log. `seq` is the job's own gap-free number (the SSE
    `id`); `id` orders events of all jobs (a cursor for the dispatcher on SQLite)."""

    id: int
    job_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Delivery:
    """A webhook notification waiting in the outbox (or delivered)."""

    event_id: int
    url: str
    job_id: str | None
    payload: Any
    attempts: int
    next_at: float
    delivered_at: str | None
    last_error: str | None


@dataclass
class _Row:
    """A job as stored: the columns the ledger maintains and the assembled record."""

    id: str
    status: str
    created_at: str
    finished_at: str | None
    last_seq: int
    record: Record


class SqlLedger:
    """The `Ledger` (and the service's store) over SQLAlchemy Core.

    `url`: `sqlite:///path/to/gembatch.db` (a file: created with its directory if missing)
    or `postgresql+psycopg://...`. `on_change(old, new)` returns the events a change
    produces (`gembatch.server.events.events_for`); they are written with the change, in
    its transaction. `view(record)` gives the job's public status object (the service's
    JobStatus), stored with every change for `status_view`. Both must be pure and fast,
    like every callback given to `apply` and `transact`: they run while the database is
    locked for writing; they see records as stored. `data_dir` (the service's): records
    are stored with their paths relative to it and handed out with them resolved against
    it (`gembatch.ledger.paths`), so the database moves with its data directory.

    Thread-safe; after `fork()` the child opens its own connections. `writes` counts the
    committed transactions that changed something; `busy_retries` the times a busy SQLite
    database was waited for again.
    """

    def __init__(
        self,
        url: str | sa.URL,
        *,
        on_change: OnChange | None = None,
        view: View | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Callable[[], float] = time.time,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.url = driver_url(url)
        self.on_change = on_change
        self.view = view
        self.paths = DataDir.of(data_dir) if data_dir is not None else None
        self.busy_timeout = float(busy_timeout)
        self.clock = clock
        self.writes = 0
        self.busy_retries = 0
        self._counters = threading.Lock()
        self._local = threading.local()
        self._pid = os.getpid()
        self._sqlite_path: Path | None = None
        self._channel: str | None = None
        self._commit_listeners: list[Callable[[dict[str, int]], None]] = []
        self._raw: dict[int, sqlite3.Connection] = {}  # SQLite: per-thread reads
        self._write_mutex = threading.Lock()  # SQLite: this process's writers in turn
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._engine = self._create_engine()
        if self._sqlite_path is not None:
            _SQLITE_LEDGERS.add(self)
        try:
            self._migrate()
            if self.dialect == "postgresql":
                _ = self.notify_channel
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"SqlLedger({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> SqlLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def notify_channel(self) -> str | None:
        """PostgreSQL: the LISTEN channel on which every commit that adds events to a job
        announces `<job id> <last seq>` (NOTIFY is delivered at commit, so a listener that
        hears it can read the events). None on SQLite (one process tails the log)."""
        if self.dialect != "postgresql":
            return None
        if self._channel is None:
            schema = self._run(
                lambda conn: conn.execute(sa.text("SELECT current_schema()")).scalar(),
                write=False,
            )
            self._channel = f"gembatch_events_{schema}"[:63]
        return self._channel

    def close(self) -> None:
        self._close_raw()
        self._engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        self._lock_fd = None

    def add_commit_listener(self, listener: Callable[[dict[str, int]], None]) -> None:
        """Call `listener(notes)` after each commit, in this process, that added events
        (`job id -> its last seq`) or deleted jobs (`job id -> -1`). It runs in the
        committing thread, after the commit: it must be quick and must not raise."""
        self._commit_listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[dict[str, int]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._commit_listeners.remove(listener)

    # -- the engine's interface (the Ledger contract) --------------------------------------

    def load(self) -> LedgerSnapshot:
        """Every job, oldest first (`created_at`, then id). `problems` is always empty: a
        row cannot hold a record that does not parse."""
        rows = self._run(lambda conn: self._select(conn, None), write=False)
        return LedgerSnapshot([self._out(row.record) for row in rows], [])

    def load_active(self) -> LedgerSnapshot:
        """Like `load`, without finished jobs (completed, failed, cancelled). Records
        without a status (the original tool's) count as active, as in JsonlLedger."""
        rows = self._run(lambda conn: self._select(conn, _ACTIVE), write=False)
        return LedgerSnapshot([self._out(row.record) for row in rows], [])

    def load_cleanup_pending(self) -> LedgerSnapshot:
        """Finished jobs with something remote still to delete: a finished task keeps
        `not_before` (when its cleanup is due) until all is gone, so they are found by the
        tasks' (state, not_before) index, not by reading every finished job."""
        pending = sa.select(m.tasks.c.job_id).where(
            m.tasks.c.state.in_(FINISHED_TASK_STATES), m.tasks.c.not_before.is_not(None)
        )
        where = sa.and_(m.jobs.c.status.in_(TERMINAL), m.jobs.c.id.in_(pending))
        rows = self._run(lambda conn: self._select(conn, where), write=False)
        return LedgerSnapshot([row.record for row in rows], [])

    def add(self, record: Record) -> bool:
        return self.add_many([record])[0]

    def add_many(self, records: Iterable[Record]) -> list[bool]:
        """Add records in one transaction; False (and nothing written) for each record
        whose id exists already, or repeats an id added earlier in the same call."""
        new = list(records)
        for record in new:
            _check_id(record)
        if not new:
            return []

        def work(conn: Connection) -> list[bool]:
            # Checked, then inserted, under SQLite's write lock. PostgreSQL: a concurrent
            # add of the same id fails this transaction on the primary key (the PostgreSQL
            # issue adds ON CONFLICT DO NOTHING in a dialect branch).
            ids = [record_id(record) for record in new]
            existing = self._existing_ids(conn, ids)
            added, fresh = [], []
            for job_id, record in zip(ids, new, strict=True):
                if job_id in existing:
                    added.append(False)
                    continue
                existing.add(job_id)
                fresh.append(self._in(_normal(_with_id(record, job_id))))
                added.append(True)
            if fresh:
                self._insert(conn, fresh)
            return added

        return self._run(work, write=True)

    def update_many(self, records: Iterable[Record]) -> int:
        """Replace whole records by id in one transaction; returns how many ids matched.
        An illegal status change refuses the whole call (InvalidTransition) and changes
        nothing; unchanged records are not rewritten; unknown ids are ignored."""
        updates = list(records)
        for record in updates:
            _check_id(record)

        def work(conn: Connection) -> int:
            ids = [record_id(record) for record in updates]
            rows = self._rows_by_id(conn, ids, lock=True)
            planned = []
            for job_id, record in zip(ids, updates, strict=True):
                row = rows.get(job_id)
                if row is None:
                    continue
                new = self._in(_normal(_with_id(record, job_id), row.record))
                _check_status_change(row.record, new)
                planned.append((job_id, new))
            now = self.clock()
            for job_id, new in planned:
                row = rows[job_id]
                if new != row.record:
                    rows[job_id] = self._update(conn, row, new, self._events(row.record, new), now)
            return len(planned)

        return self._run(work, write=True)

    def apply(self, changes: Mapping[str, Change]) -> ApplyResult:
        """Run each change on the CURRENT record of its id, all in ONE transaction.

        A change returns the new record, or None for "no change". If it raises, its job is
        left as it was and the exception is returned in `errors`; the others still commit.
        A status change the transition table does not allow is refused the same way (an
        InvalidTransition, recorded in the audit log). Ids not found go to `missing`. The
        events `on_change` gives for each changed job are written in the same transaction.
        """
        if not changes:
            return ApplyResult()
        return self._run(lambda conn: self._apply(conn, changes), write=True)

    def transact(self, select: Callable[[list[Record]], Any]) -> ApplyResult:
        """Decide on changes from the current records, then apply them, in one write
        transaction: no other writer can act in between (e.g. claim within a global limit).

        Unlike JsonlLedger, which hands `select` every record, `select` receives only the
        ACTIVE records (as `load_active`): a service database holds years of finished
        jobs, and decisions are about unfinished work. `select` returns a mapping of
        changes (as for `apply`; {} applies nothing), or `(changes, new_records)` to also
        add records (`result.added`, as `add_many`). It may call this ledger's other
        methods; they join the same transaction.
        """

        def work(conn: Connection) -> ApplyResult:
            self._serialize_decisions(conn)
            records = [self._out(row.record) for row in self._select(conn, _ACTIVE)]
            outcome = select(records)
            changes, new_records = outcome if isinstance(outcome, tuple) else (outcome, [])
            result = self._apply(conn, changes) if changes else ApplyResult()
            if new_records:
                result.added = self.add_many(new_records)
            return result

        return self._run(work, write=True)

    def claim_starts(
        self,
        select: Callable[[list[Record], int], Mapping[str, Change]],
        *,
        max_busy: int,
        now: float,
        spare: int = 50,
    ) -> ApplyResult:
        """Claim work to start within a global limit, in one short transaction.

        Claims are serialised (SQLite: the write lock; PostgreSQL: an advisory lock held
        to commit), so the count of busy tasks cannot change under a decision and the
        limit holds across processes. Only the jobs that may be taken are read: those with
        a due, claimable task, highest priority first, then oldest; on PostgreSQL rows
        another writer holds (a poll result being written) are skipped (`FOR UPDATE SKIP
        LOCKED`) rather than waited for. `select(records, busy)` decides, as for
        `transact` (it must not modify `records`); `busy` counts the tasks holding or about
        to hold a remote batch.
        """

        def work(conn: Connection) -> ApplyResult:
            self._serialize_decisions(conn)
            busy_query = (
                sa.select(sa.func.count())
                .select_from(m.tasks)
                .where(m.tasks.c.state.in_(BUSY_TASK_STATES))
            )
            busy = int(conn.execute(busy_query).scalar() or 0)
            free = max_busy - busy
            if free <= 0:
                return ApplyResult()
            due = sa.or_(m.tasks.c.not_before.is_(None), m.tasks.c.not_before <= now)
            claimable = (
                sa.select(m.tasks.c.job_id)
                .where(
                    m.tasks.c.job_id == m.jobs.c.id,
                    m.tasks.c.state.in_(CLAIMABLE_TASK_STATES),
                    due,
                )
                .exists()
            )
            query = (
                sa.select(m.jobs.c.id)
                .where(m.jobs.c.status.in_(STARTABLE_STATUSES), claimable)
                .order_by(m.jobs.c.priority.desc(), m.jobs.c.created_at, m.jobs.c.id)
                .limit(free + spare)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True, of=m.jobs)
            ids = list(conn.execute(query).scalars())
            if not ids:
                return ApplyResult()
            rows = self._rows_by_id(conn, ids, lock=False)
            records = [self._out(rows[job_id].record) for job_id in ids if job_id in rows]
            changes = select(records, busy)  # reads them; each change gets its own copy
            # The rows are locked already (SQLite: the write lock; PostgreSQL: FOR UPDATE
            # above): no need to read them again.
            return self._apply(conn, changes, rows) if changes else ApplyResult()

        return self._run(work, write=True)

    def find_by_input(self, input_file: str) -> Record | None:
        """The oldest job whose `input_file` names the same file (`./a` is `a`)."""
        key = m.input_key({"input_file": input_file})
        if key is None:
            return None

        def work(conn: Connection) -> Record | None:
            rows = self._select(conn, m.jobs.c.input_file == key, limit=1)
            return self._out(rows[0].record) if rows else None

        return self._run(work, write=False)

    def find_by_batch(self, batch_name: str) -> Record | None:
        """The oldest job that refers to remote batch `batch_name`, at job level (the
        original tool's `batch.name` / `job_name`) or in one of its tasks."""

        def work(conn: Connection) -> Record | None:
            in_tasks = sa.select(m.tasks.c.job_id).where(m.tasks.c.batch_name == batch_name)
            where = sa.or_(m.jobs.c.batch_name == batch_name, m.jobs.c.id.in_(in_tasks))
            for row in self._select(conn, where):
                if batch_name in batch_names(row.record):
                    return self._out(row.record)
            return None

        return self._run(work, write=False)

    def find_by_id(self, job_id: str) -> Record | None:
        return self.get(job_id)

    # -- jobs for the service --------------------------------------------------------------

    def get(self, job_id: str, user_id: str | None = None) -> Record | None:
        """The job, or None. With `user_id`, another user's job is None too ("not found":
        its existence is not revealed)."""
        if _no_such_key(job_id, user_id):
            return None
        where = m.jobs.c.id == job_id
        if user_id is not None:
            where = sa.and_(where, m.jobs.c.user_id == user_id)

        def work(conn: Connection) -> Record | None:
            rows = self._select(conn, where)
            return self._out(rows[0].record) if rows else None

        return self._run(work, write=False)

    @property
    def reads_inline(self) -> bool:
        """Whether a one-row read may run on an event loop: SQLite in WAL mode never waits
        for a writer; PostgreSQL is a network round trip (use a thread)."""
        return self._sqlite_path is not None

    def status_view(self, job_id: str, user_id: str | None = None) -> str | None:
        """The job's public status as JSON text (what `view` gave at its last change), or
        None when there is no such job (or it is another user's). One indexed read of
        one column; on SQLite over a connection of this thread's own, without the pool."""
        if _no_such_key(job_id, user_id):
            return None
        if self._sqlite_path is not None:
            row = (
                self._raw_sqlite()
                .execute(
                    _VIEW_SQL if user_id is None else _VIEW_BY_USER_SQL,
                    (job_id,) if user_id is None else (job_id, user_id),
                )
                .fetchone()
            )
            found, text = (row is not None), (row[0] if row is not None else None)
        else:
            query = _VIEW_BY_ID if user_id is None else _VIEW_BY_USER
            params = {"b_id": job_id} if user_id is None else {"b_id": job_id, "b_user": user_id}
            result = self._run(lambda conn: conn.execute(query, params).first(), write=False)
            found, text = (result is not None), (result[0] if result is not None else None)
        if not found:
            return None
        if text is None:  # written by an older version, unchanged since: build it
            record = self.get(job_id, user_id)
            if record is None:
                return None
            if self.view is None:
                raise RuntimeError("status_view needs the ledger's `view` function")
            return json.dumps(self.view(record), ensure_ascii=False)
        return text

    def _raw_sqlite(self) -> sqlite3.Connection:
        """This thread's own autocommit connection for one-row reads."""
        self._after_fork()
        thread = threading.get_ident()
        conn = self._raw.get(thread)
        if conn is None:
            assert self._sqlite_path is not None
            conn = sqlite3.connect(
                self._sqlite_path, timeout=self.busy_timeout, check_same_thread=False,
                isolation_level=None,
            )  # fmt: skip
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._raw[thread] = conn
        return conn

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, {}
        for conn in raw.values():
            with contextlib.suppress(Exception):
                conn.close()

    def list_jobs(
        self,
        user_id: str | None = None,
        status: str | Collection[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Record]:
        """Jobs newest first, optionally one user's and/or in some statuses (the stored
        statuses: `cancelling` is its own)."""
        clauses = []
        if user_id is not None:
            clauses.append(m.jobs.c.user_id == user_id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            clauses.append(m.jobs.c.status.in_(wanted))
        where = sa.and_(*clauses) if clauses else None
        order = (m.jobs.c.created_at.desc(), m.jobs.c.id.desc())

        def work(conn: Connection) -> list[Record]:
            rows = self._select(conn, where, order=order, limit=limit, offset=offset)
            return [self._out(row.record) for row in rows]

        return self._run(work, write=False)

    def delete_job(
        self, job_id: str, *, actor: str, reason: str, force: bool = False
    ) -> Record | None:
        """Delete a job with its tasks and events; the audit row written with it survives.
        Returns the deleted record (None: no such job).

        A running or cancelling job is refused (InvalidTransition, audited) unless
        `force`: its remote batch may still be working. The service's forced delete
        cancels first and deletes once the job is cancelled, or passes `force=True`.
        """

        def work(conn: Connection) -> Record | InvalidTransition | None:
            rows = self._rows_by_id(conn, [job_id], lock=True)
            row = rows.get(job_id)
            if row is None:
                return None
            if row.status in _UNDELETABLE and not force:
                refusal = InvalidTransition("job", row.status, JobEvent.DELETE)
                self._audit(conn, actor, "refused_transition", job_id, _refusal(refusal, reason))
                return refusal
            self._delete(conn, [job_id])
            detail = {"reason": reason, "status": row.status, "force": force}
            self._audit(conn, actor, "delete", job_id, detail)
            return self._out(row.record)

        outcome = self._run(work, write=True)
        if isinstance(outcome, InvalidTransition):
            raise outcome
        return outcome

    def prune(
        self,
        max_age_hours: float,
        *,
        now: float | None = None,
        batch: int = 500,
        actor: str = "cleaner",
    ) -> list[str]:
        """Delete finished jobs (completed, failed, cancelled) that finished more than
        `max_age_hours` ago, `batch` per transaction, each with its tasks and events and
        one audit row. Unfinished jobs are never touched. Returns the deleted ids."""
        cutoff = _iso((self.clock() if now is None else now) - max_age_hours * 3600)
        deleted: list[str] = []

        def one_batch(conn: Connection) -> list[str]:
            query = (
                sa.select(m.jobs.c.id, m.jobs.c.status, m.jobs.c.finished_at)
                .where(m.jobs.c.status.in_(PRUNABLE), m.jobs.c.finished_at < cutoff)
                .order_by(m.jobs.c.finished_at, m.jobs.c.id)
                .limit(batch)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            ids = [row.id for row in rows]
            if ids:
                self._delete(conn, ids)
                at = _iso(self.clock())
                conn.execute(
                    m.audit.insert(),
                    [
                        {
                            "at": at,
                            "actor": actor,
                            "action": "prune",
                            "job_id": row.id,
                            "detail": {
                                "status": row.status,
                                "finished_at": row.finished_at,
                                "max_age_hours": max_age_hours,
                            },
                        }
                        for row in rows
                    ],
                )
            return ids

        while True:
            ids = self._run(one_batch, write=True)
            deleted.extend(ids)
            if len(ids) < batch:
                return deleted

    # -- events ----------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int | None:
        """The seq of the job's latest event (0: none yet); None: no such job."""
        if _no_such_key(job_id):
            return None
        query = sa.select(m.jobs.c.last_seq).where(m.jobs.c.id == job_id)
        return self._run(lambda conn: conn.execute(query).scalar_one_or_none(), write=False)

    def events_after(self, job_id: str, after_seq: int, limit: int = 1000) -> list[StoredEvent]:
        """The job's events with seq > `after_seq`, in seq order (SSE replay)."""
        if _no_such_key(job_id) or after_seq > _INT_MAX:
            return []
        query = (
            sa.select(m.job_events)
            .where(m.job_events.c.job_id == job_id, m.job_events.c.seq > after_seq)
            .order_by(m.job_events.c.seq)
            .limit(limit)
        )
        return self._run(lambda conn: _stored(conn.execute(query)), write=False)

    def events_since(
        self, after_id: int, types: Collection[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        """Events of every job with id > `after_id`, in id order (the SSE dispatcher and the
        notifier tail this). On SQLite writers are serialised, so ids commit in order and
        the cursor misses nothing; on PostgreSQL ids are allocated before commit and can
        become visible out of order: tail per job by seq there (LISTEN/NOTIFY)."""
        query = sa.select(m.job_events).where(m.job_events.c.id > after_id)
        if types is not None:
            query = query.where(m.job_events.c.type.in_(list(types)))
        query = query.order_by(m.job_events.c.id).limit(limit)
        return self._run(lambda conn: _stored(conn.execute(query)), write=False)

    def present_ids(self, ids: Collection[str]) -> set[str]:
        """Which of `ids` are jobs in the ledger now."""
        return self._run(lambda conn: self._existing_ids(conn, list(ids)), write=False)

    def last_event_id(self) -> int:
        """The highest event id (0 when there are none): where a new tail starts."""
        query = sa.select(sa.func.max(m.job_events.c.id))
        return self._run(lambda conn: conn.execute(query).scalar() or 0, write=False)

    def count_jobs_by_status(self) -> dict[str, int]:
        """Jobs per (internal) status, in one query."""
        query = sa.select(m.jobs.c.status, sa.func.count()).group_by(m.jobs.c.status)
        return self._run(lambda conn: {status: n for status, n in conn.execute(query)}, write=False)

    def count_pending_deliveries(self) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(m.deliveries)
            .where(m.deliveries.c.delivered_at.is_(None))
        )
        return self._run(lambda conn: conn.execute(query).scalar() or 0, write=False)

    def append_event(self, job_id: str, event: _EventLike) -> int | None:
        """Add an event not tied to a change (an audit event, say); returns its seq, or
        None when the job does not exist."""

        def work(conn: Connection) -> int | None:
            query = sa.select(m.jobs.c.last_seq).where(m.jobs.c.id == job_id).with_for_update()
            last = conn.execute(query).scalar_one_or_none()
            if last is None:
                return None
            conn.execute(m.job_events.insert(), _event_rows(job_id, last, [event], self.clock()))
            conn.execute(m.jobs.update().where(m.jobs.c.id == job_id).values(last_seq=last + 1))
            self._announce(conn, {job_id: last + 1})
            self._dirty()
            return last + 1

        return self._run(work, write=True)

    # -- audit -----------------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        action: str,
        job_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a security-relevant action (kept after its job is deleted)."""
        self._run(lambda conn: self._audit(conn, actor, action, job_id, detail), write=True)

    def audit_log(
        self, job_id: str | None = None, limit: int = 1000, after_id: int = 0
    ) -> list[dict[str, Any]]:
        """Audit rows (of one job, or all), oldest first, after `after_id`."""
        query = sa.select(m.audit).where(m.audit.c.id > after_id)
        if job_id is not None:
            query = query.where(m.audit.c.job_id == job_id)
        query = query.order_by(m.audit.c.id).limit(limit)
        return self._run(
            lambda conn: [dict(row._mapping) for row in conn.execute(query)], write=False
        )

    # -- webhook deliveries (an outbox) ----------------------------------------------------

    def enqueue_delivery(
        self,
        event_id: int,
        job_id: str | None,
        url: str,
        payload: Any,
        *,
        next_at: float | None = None,
    ) -> bool:
        """Queue `payload` for POSTing to `url`; False if (event_id, url) is queued
        already (so a notifier that restarts does not notify twice)."""
        if _no_such_key(url, job_id):
            raise UnstorableRecord(f"a webhook URL or job id holds NUL (\\u0000): {url!r:.200}")
        key = (m.deliveries.c.event_id == event_id, m.deliveries.c.url == url)

        def work(conn: Connection) -> bool:
            if conn.execute(sa.select(m.deliveries.c.event_id).where(*key)).first():
                return False
            conn.execute(
                m.deliveries.insert().values(
                    event_id=event_id,
                    url=url,
                    job_id=job_id,
                    payload=payload,
                    attempts=0,
                    next_at=self.clock() if next_at is None else next_at,
                )
            )
            self._dirty()
            return True

        try:
            return self._run(work, write=True)
        except sa_exc.IntegrityError:  # a concurrent enqueue of the same pair won (PostgreSQL)
            return False

    def due_deliveries(self, now: float, limit: int = 100) -> list[Delivery]:
        """Undelivered notifications whose next attempt is due, earliest first."""
        query = (
            sa.select(m.deliveries)
            .where(m.deliveries.c.delivered_at.is_(None), m.deliveries.c.next_at <= now)
            .order_by(m.deliveries.c.next_at, m.deliveries.c.event_id, m.deliveries.c.url)
            .limit(limit)
        )
        return self._run(
            lambda conn: [Delivery(**row._mapping) for row in conn.execute(query)], write=False
        )

    def claim_due_deliveries(
        self, now: float, lease_seconds: float, limit: int = 100
    ) -> list[Delivery]:
        """Take the due deliveries for sending: their `next_at` moves to `now +
        lease_seconds` in the same transaction, so no other process sends them meanwhile;
        a sender that dies leaves them due again when the lease runs out. PostgreSQL
        skips rows another claim holds (SKIP LOCKED); SQLite writers are serialised."""
        until = now + lease_seconds
        query = (
            sa.select(m.deliveries)
            .where(m.deliveries.c.delivered_at.is_(None), m.deliveries.c.next_at <= now)
            .order_by(m.deliveries.c.next_at, m.deliveries.c.event_id, m.deliveries.c.url)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        lease = (
            m.deliveries.update()
            .where(
                m.deliveries.c.event_id == sa.bindparam("b_event_id"),
                m.deliveries.c.url == sa.bindparam("b_url"),
            )
            .values(next_at=until)
        )

        def work(conn: Connection) -> list[Delivery]:
            due = [Delivery(**{**row._mapping, "next_at": until}) for row in conn.execute(query)]
            if due:
                conn.execute(lease, [{"b_event_id": d.event_id, "b_url": d.url} for d in due])
                self._dirty()
            return due

        return self._run(work, write=True)

    def mark_delivered(self, event_id: int, url: str, at: float | str | None = None) -> None:
        when = at if isinstance(at, str) else _iso(self.clock() if at is None else at)
        self._update_delivery(event_id, url, delivered_at=when, last_error=None)

    def mark_failed(self, event_id: int, url: str, error: str, next_at: float) -> None:
        """An attempt failed: try again at `next_at` (the notifier's backoff decides)."""
        self._update_delivery(event_id, url, last_error=error, next_at=next_at)

    def _update_delivery(self, event_id: int, url: str, **values: Any) -> None:
        statement = (
            m.deliveries.update()
            .where(m.deliveries.c.event_id == event_id, m.deliveries.c.url == url)
            .values(attempts=m.deliveries.c.attempts + 1, **values)
        )

        def work(conn: Connection) -> None:
            if conn.execute(statement).rowcount:
                self._dirty()

        self._run(work, write=True)

    # -- meta, schema, backup --------------------------------------------------------------

    def meta_get(self, key: str) -> str | None:
        query = sa.select(m.meta.c.value).where(m.meta.c.key == key)
        return self._run(lambda conn: conn.execute(query).scalar_one_or_none(), write=False)

    def meta_set(self, key: str, value: str) -> None:
        self._run(lambda conn: self._meta_set(conn, key, value), write=True)

    def schema_version(self) -> int:
        return self._run(m.read_version, write=False)

    def restore_generation(self) -> int:
        """Bumped after every restore: leases taken before it are foreign."""
        return int(self.meta_get(m.RESTORE_GENERATION_KEY) or 0)

    def bump_restore_generation(self) -> int:
        def work(conn: Connection) -> int:
            query = sa.select(m.meta.c.value).where(m.meta.c.key == m.RESTORE_GENERATION_KEY)
            value = int(conn.execute(query.with_for_update()).scalar_one_or_none() or 0) + 1
            self._meta_set(conn, m.RESTORE_GENERATION_KEY, str(value))
            return value

        return self._run(work, write=True)

    def backup(self, path: str | os.PathLike[str]) -> Path:
        """A consistent copy of the database taken while it is in use (SQLite's online
        backup), checked with `PRAGMA integrity_check`, then moved into place at `path`.
        PostgreSQL has its own tools: see the README (pg_dump / pg_restore)."""
        if self._sqlite_path is None:
            raise NotImplementedError(
                f"backup() copies SQLite databases; {self.dialect} is backed up with its own "
                "tools (PostgreSQL: pg_dump -Fc, restored with pg_restore; see the README)"
            )
        target = Path(path)
        if target.resolve() == self._sqlite_path.resolve():
            raise ValueError(f"cannot back up {target} onto itself")
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.backup-{os.getpid()}.tmp")
        _remove_database_files(temp)
        try:
            source = sqlite3.connect(self._sqlite_path, timeout=self.busy_timeout)
            try:
                copy = sqlite3.connect(temp)
                try:
                    source.backup(copy)  # all pages in one step: one consistent snapshot
                    problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
                finally:
                    copy.close()
            finally:
                source.close()
            if problems != ["ok"]:
                raise LedgerFileError(
                    f"the backup of {self._sqlite_path} failed its integrity check "
                    f"({'; '.join(problems[:5])}); nothing was written to {target}: "
                    "check the disk, then try again"
                )
            os.replace(temp, target)
            fsutil.fsync_dir(target.parent)
        finally:
            _remove_database_files(temp)
        return target

    # -- transactions ----------------------------------------------------------------------

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() != "sqlite":
            # PostgreSQL (psycopg 3): READ COMMITTED, rows locked with FOR UPDATE.
            return sa.create_engine(self.url, pool_pre_ping=True)
        database = self.url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ValueError(
                f"the SQL ledger needs a database file (sqlite:///path/to/gembatch.db), "
                f"not {self.url}: separate connections to one in-memory database see "
                "separate databases"
            )
        self._sqlite_path = Path(database)
        self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            self.url,
            connect_args={"check_same_thread": False, "timeout": self.busy_timeout},
        )
        sa.event.listen(engine, "connect", self._on_sqlite_connect)
        sa.event.listen(engine, "begin", _on_sqlite_begin)
        return engine

    def _on_sqlite_connect(self, dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy's recipe: pysqlite must not emit BEGIN itself (it skips it before a
        # SELECT, breaking snapshot reads); `_on_sqlite_begin` emits the right one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    def _run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Run `work` in one transaction (a write one if `write`), retrying a busy
        database. A call made from inside `work` (transact's select calling add_many)
        joins the transaction already open in this thread."""
        self._after_fork()
        local = self._local
        outer: Connection | None = getattr(local, "conn", None)
        if outer is not None:
            if write and not local.write:
                raise RuntimeError("a ledger write cannot run inside a read-only transaction")
            return work(outer)
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._write_turn(write), self._engine.connect() as conn:
                    conn.execution_options(**{_WRITE: write})
                    local.conn, local.write, local.dirty = conn, write, False
                    local.notes = {}
                    try:
                        with conn.begin():
                            result = work(conn)
                    finally:
                        local.conn = None
                break
            except (sa_exc.DBAPIError, sqlite3.OperationalError) as exc:
                if attempt >= BUSY_ATTEMPTS or not self._retryable(exc):
                    raise
                with self._counters:
                    self.busy_retries += 1
                time.sleep(random.uniform(0.002, min(1.0, 0.01 * 2**attempt)))
        if local.dirty:
            with self._counters:
                self.writes += 1
        notes, local.notes = local.notes, None
        if notes and self._commit_listeners:
            for listener in list(self._commit_listeners):
                try:
                    listener(notes)
                except Exception:  # a listener's trouble is not the write's
                    _log.exception("commit listener failed")
        return result

    @contextlib.contextmanager
    def _write_turn(self, write: bool) -> Iterator[None]:
        """SQLite: writers of this database take turns here before BEGIN IMMEDIATE:
        threads by a mutex, processes by `flock` on `<db>.write.lock`. A waiter is woken
        the moment the writer before it is done; SQLite's own busy handler would have it
        sleep 1-100 ms at a time, so under contention the database sat idle between
        writes. Writers that do not take turns (another tool) still meet busy_timeout."""
        if not write or self._sqlite_path is None:
            yield
            return
        with self._write_mutex:
            fd = self._write_lock_fd()
            if fd is None:
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _write_lock_fd(self) -> int | None:
        if fcntl is None:  # pragma: no cover - not on Windows
            return None
        if self._lock_fd is None or self._lock_pid != os.getpid():
            assert self._sqlite_path is not None
            path = f"{self._sqlite_path}.write.lock"
            try:
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:  # a read-only directory: SQLite's own locking still holds
                return None
            self._lock_pid = os.getpid()
        return self._lock_fd

    def _retryable(self, exc: BaseException) -> bool:
        """SQLITE_BUSY/LOCKED; on PostgreSQL a serialization failure or a deadlock. Only
        whole transactions are retried, and the callbacks in them are pure."""
        orig = getattr(exc, "orig", exc)
        if self._sqlite_path is not None:
            code = getattr(orig, "sqlite_errorcode", None)
            if isinstance(code, int) and code & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
                return True
            text = str(orig).lower()
            return "database is locked" in text or "database is busy" in text
        return getattr(orig, "sqlstate", None) in ("40001", "40P01")

    def _after_fork(self) -> None:
        # Pooled connections must not be shared with a forked child: drop them (without
        # closing them, which would disturb the parent's) and open new ones.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._engine.dispose(close=False)
            self._local = threading.local()
            # The parent's per-thread connections: never used here, nor closed (closing
            # the last connection of a WAL database may checkpoint it from this child).
            _FORKED_AWAY.append(self._raw)
            self._raw = {}

    def _dirty(self) -> None:
        self._local.dirty = True

    def _serialize_decisions(self, conn: Connection) -> None:
        """`transact` decides from all active jobs: no other decision may interleave.
        SQLite's write lock (BEGIN IMMEDIATE) already serialises writers; PostgreSQL
        takes a transaction-scoped advisory lock (released at commit)."""
        if self.dialect == "postgresql":  # per schema: several ledgers may share a database
            key = "hashtext('gembatch.transact.' || current_schema())"
            conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({key})"))

    def _migrate(self) -> None:
        where = self.url.render_as_string(hide_password=True)
        version = self._run(m.read_version, write=False)
        m.check_supported(version, where)
        for migration in m.pending(version):
            self._run(lambda conn, mig=migration: m.apply_migration(conn, mig, where), write=True)

    # -- rows <-> records ------------------------------------------------------------------

    def _select(
        self,
        conn: Connection,
        where: Any,
        *,
        order: Sequence[Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        lock: bool = False,
    ) -> list[_Row]:
        query = sa.select(
            m.jobs.c.id,
            m.jobs.c.status,
            m.jobs.c.created_at,
            m.jobs.c.finished_at,
            m.jobs.c.last_seq,
            m.jobs.c.record,
        )
        if where is not None:
            query = query.where(where)
        query = query.order_by(*(order or (m.jobs.c.created_at, m.jobs.c.id)))
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        if lock:
            query = query.with_for_update()  # nothing on SQLite: BEGIN IMMEDIATE locked it all
        rows = [
            _Row(r.id, r.status, r.created_at, r.finished_at, r.last_seq, r.record)
            for r in conn.execute(query)
        ]
        split = [row for row in rows if isinstance(row.record.get("tasks"), list)]
        for chunk in _chunks([row.id for row in split]):
            found: dict[str, list[Any]] = {}
            task_query = (
                sa.select(m.tasks.c.job_id, m.tasks.c.record)
                .where(m.tasks.c.job_id.in_(chunk))
                .order_by(m.tasks.c.job_id, m.tasks.c.idx)
            )
            for job_id, task in conn.execute(task_query):
                found.setdefault(job_id, []).append(task)
            for row in split:
                if row.id in found:
                    row.record["tasks"] = found[row.id]
        return rows

    def _rows_by_id(self, conn: Connection, ids: Sequence[str], *, lock: bool) -> dict[str, _Row]:
        """The rows of `ids`, locked in ascending id order on PostgreSQL (one lock order
        for every writer: no deadlocks between two multi-job applies)."""
        rows: dict[str, _Row] = {}
        for chunk in _chunks(sorted(set(ids))):
            where = m.jobs.c.id.in_(chunk)
            for row in self._select(conn, where, order=(m.jobs.c.id,), lock=lock):
                rows[row.id] = row
        return rows

    def _existing_ids(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(set(ids))):
            query = sa.select(m.jobs.c.id).where(m.jobs.c.id.in_(chunk))
            found.update(conn.execute(query).scalars())
        return found

    def _apply(
        self,
        conn: Connection,
        changes: Mapping[str, Change],
        rows: dict[str, _Row] | None = None,
    ) -> ApplyResult:
        """`rows`: the jobs as this transaction has already read (and locked) them."""
        result = ApplyResult()
        if rows is None or not all(job_id in rows for job_id in changes):
            rows = self._rows_by_id(conn, list(changes), lock=True)
        now = self.clock()
        staged = _Staged()
        for job_id, change in changes.items():
            row = rows.get(job_id)
            if row is None:
                result.missing.append(job_id)
                continue
            try:
                new = change(self._out(copy_record(row.record)))
            except Exception as exc:
                result.errors[job_id] = exc
                if getattr(exc, "code", None) == "LEASE_LOST":  # a late write, refused
                    self._audit(conn, "ledger", "refused_transition", job_id, _refusal(exc))
                continue
            if new is None:
                result.records[job_id] = self._out(copy_record(row.record))
                continue
            try:
                new = self._in(
                    _normal(_with_id(new, job_id), row.record)
                )  # raises unless an object
                _check_status_change(row.record, new)
            except InvalidTransition as exc:
                result.errors[job_id] = exc
                self._audit(conn, "ledger", "refused_transition", job_id, _refusal(exc))
                continue
            except Exception as exc:
                result.errors[job_id] = exc
                continue
            if new == row.record:
                result.records[job_id] = self._out(new)  # fresh: nobody else holds it
                continue
            try:
                events = self._events(row.record, new)
            except Exception as exc:
                result.errors[job_id] = exc
                continue
            rows[job_id] = self._stage_update(staged, row, new, events, now)
            result.records[job_id] = self._out(new)  # fresh; `rows` dies with this call
        self._write_staged(conn, staged)
        return result

    def _out(self, record: Record) -> Record:
        """A record as stored -> as handed out (paths resolved against the data dir)."""
        return record if self.paths is None else self.paths.resolved(record)

    def _in(self, record: Record) -> Record:
        """A record as handed in -> as stored (paths relative to the data dir)."""
        return record if self.paths is None else self.paths.stored(record)

    def _view_text(self, record: Record) -> str | None:
        if self.view is None:
            return None
        try:
            return json.dumps(self.view(record), ensure_ascii=False)
        except Exception:  # a record the view cannot read: readers build it themselves
            _log.exception("building the status view of job %s failed", record.get("id"))
            return None

    def _events(self, old: Record | None, new: Record | None) -> list[_EventLike]:
        return list(self.on_change(old, new)) if self.on_change is not None else []

    def _insert(self, conn: Connection, records: list[Record]) -> None:
        now = self.clock()
        job_rows, task_rows, event_rows = [], [], []
        for record in records:
            events = self._events(None, record)
            stored, task_list = _split(record)
            values = _job_values(record, stored, now=now, previous=None)
            values.update(id=record["id"], last_seq=len(events), view=self._view_text(record))
            job_rows.append(values)
            task_rows.extend(_task_values(record["id"], i, t) for i, t in enumerate(task_list))
            event_rows.extend(_event_rows(record["id"], 0, events, now))
        conn.execute(m.jobs.insert(), job_rows)
        if task_rows:
            conn.execute(m.tasks.insert(), task_rows)
        if event_rows:
            conn.execute(m.job_events.insert(), event_rows)
            last: dict[str, int] = {}
            for row in event_rows:
                last[row["job_id"]] = max(last.get(row["job_id"], 0), row["seq"])
            self._announce(conn, last)
        self._dirty()

    def _update(
        self, conn: Connection, row: _Row, new: Record, events: list[_EventLike], now: float
    ) -> _Row:
        staged = _Staged()
        updated = self._stage_update(staged, row, new, events, now)
        self._write_staged(conn, staged)
        return updated

    def _stage_update(
        self, staged: _Staged, row: _Row, new: Record, events: list[_EventLike], now: float
    ) -> _Row:
        """Plan the writes that turn `row` into `new` (with its events); `_write_staged`
        sends the plans of many jobs as a few executemany calls."""
        stored, new_tasks = _split(new)
        values = _job_values(new, stored, now=now, previous=row)
        values["last_seq"] = row.last_seq + len(events)
        values["view"] = self._view_text(new)
        staged.jobs.setdefault(tuple(values), []).append({**values, "b_id": row.id})
        old_tasks = row.record.get("tasks") if isinstance(row.record.get("tasks"), list) else []
        for i, task in enumerate(new_tasks[: len(old_tasks)]):
            if task != old_tasks[i]:
                item = _task_values(row.id, i, task)
                del item["job_id"], item["idx"]
                staged.task_updates.append({"b_job_id": row.id, "b_idx": i, **item})
        staged.task_inserts.extend(
            _task_values(row.id, i, t) for i, t in enumerate(new_tasks) if i >= len(old_tasks)
        )
        if len(new_tasks) < len(old_tasks):
            staged.task_trims.append((row.id, len(new_tasks)))
        if events:
            staged.events.extend(_event_rows(row.id, row.last_seq, events, now))
            staged.announce[row.id] = values["last_seq"]
        return _Row(row.id, values["status"], values["created_at"], values["finished_at"],
                    values["last_seq"], new)  # fmt: skip

    def _write_staged(self, conn: Connection, staged: _Staged) -> None:
        if not staged.jobs:
            return
        for columns, params in staged.jobs.items():
            conn.execute(_job_update(columns), params)
        if staged.task_updates:
            conn.execute(_TASK_UPDATE, staged.task_updates)
        if staged.task_inserts:
            conn.execute(m.tasks.insert(), staged.task_inserts)
        for job_id, keep in staged.task_trims:
            conn.execute(m.tasks.delete().where(m.tasks.c.job_id == job_id, m.tasks.c.idx >= keep))
        if staged.events:
            conn.execute(m.job_events.insert(), staged.events)
            self._announce(conn, staged.announce)
        self._dirty()

    def _announce(self, conn: Connection, last_seqs: Mapping[str, int]) -> None:
        """PostgreSQL: NOTIFY `<job id> <seq>` for listeners in other processes (sent at
        commit; payloads are tiny, the events themselves are read from the log)."""
        notes = getattr(self._local, "notes", None)
        if notes is not None:
            notes.update(last_seqs)  # for this process's listeners, after the commit
        if self.dialect != "postgresql" or not last_seqs:
            return
        payloads = [
            f"{job_id} {'deleted' if seq < 0 else seq}" for job_id, seq in last_seqs.items()
        ]
        # One round trip for all of them (a claim or a poll may move a hundred jobs).
        conn.execute(
            sa.text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": self.notify_channel, "payloads": payloads},
        )

    def _delete(self, conn: Connection, ids: list[str]) -> None:
        if len(ids) <= 1000:  # a job's stream ends at once; big prunes are not watched
            self._announce(conn, dict.fromkeys(ids, -1))
        for chunk in _chunks(ids):
            conn.execute(m.tasks.delete().where(m.tasks.c.job_id.in_(chunk)))
            conn.execute(m.job_events.delete().where(m.job_events.c.job_id.in_(chunk)))
            conn.execute(m.jobs.delete().where(m.jobs.c.id.in_(chunk)))
        self._dirty()

    def _audit(
        self,
        conn: Connection,
        actor: str,
        action: str,
        job_id: str | None,
        detail: dict[str, Any] | None,
    ) -> None:
        conn.execute(
            m.audit.insert().values(
                at=_iso(self.clock()), actor=actor, action=action, job_id=job_id, detail=detail
            )
        )
        self._dirty()

    def _meta_set(self, conn: Connection, key: str, value: str) -> None:
        statement = m.meta.update().where(m.meta.c.key == key).values(value=value)
        if not conn.execute(statement).rowcount:
            conn.execute(m.meta.insert().values(key=key, value=value))
        self._dirty()


_ACTIVE = m.jobs.c.status.not_in(TERMINAL)
_VIEW_BY_ID = sa.select(m.jobs.c.view).where(m.jobs.c.id == sa.bindparam("b_id"))
_VIEW_BY_USER = sa.select(m.jobs.c.view).where(
    m.jobs.c.id == sa.bindparam("b_id"), m.jobs.c.user_id == sa.bindparam("b_user")
)
_VIEW_SQL = "SELECT view FROM jobs WHERE id = ?"
_VIEW_BY_USER_SQL = "SELECT view FROM jobs WHERE id = ? AND user_id = ?"


@dataclass
class _Staged:
    """The writes of one `apply`, gathered so that many jobs cost a few statements."""

    jobs: dict[tuple[str, ...], list[dict[str, Any]]] = field(default_factory=dict)
    task_updates: list[dict[str, Any]] = field(default_factory=list)
    task_inserts: list[dict[str, Any]] = field(default_factory=list)
    task_trims: list[tuple[str, int]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    announce: dict[str, int] = field(default_factory=dict)


_TASK_UPDATE = (
    sa.update(m.tasks)
    .where(m.tasks.c.job_id == sa.bindparam("b_job_id"), m.tasks.c.idx == sa.bindparam("b_idx"))
    .values(
        {
            name: sa.bindparam(name)
            for name in ("state", "display_name", "batch_name", "record", "not_before")
        }
    )
)


@functools.lru_cache(maxsize=8)
def _job_update(columns: tuple[str, ...]) -> Any:
    """One UPDATE statement per set of columns, built once: SQLAlchemy then compiles it
    once too (building a statement per row cost more than the write itself)."""
    return (
        m.jobs.update()
        .where(m.jobs.c.id == sa.bindparam("b_id"))
        .values({name: sa.bindparam(name) for name in columns})
    )


# Task states (the engine's TaskState values) for claims: which may be started, and
# which hold (or are about to hold) one of the live remote batches of the global limit.
CLAIMABLE_TASK_STATES = ("new", "uploaded")
BUSY_TASK_STATES = tuple(sorted({"uploading", *(state.value for state in TASK_LIVE)}))
FINISHED_TASK_STATES = tuple(sorted(state.value for state in TASK_TERMINAL))
STARTABLE_STATUSES = ("pending", "running")

# SQLite keeps per-process lock bookkeeping, and an idle WAL connection holds a shared
# lock. A child forked with such connections open believes it holds locks it does not
# (fcntl locks are not inherited), which can let another process reset the WAL under it.
# So before any fork every SQLite ledger closes its idle connections; they reopen on use.
_SQLITE_LEDGERS: weakref.WeakSet[SqlLedger] = weakref.WeakSet()
_FORKED_AWAY: list[dict[int, sqlite3.Connection]] = []  # a child's inherited connections


def _close_idle_sqlite_connections() -> None:
    for ledger in list(_SQLITE_LEDGERS):
        ledger._engine.dispose()


os.register_at_fork(before=_close_idle_sqlite_connections)


def _on_sqlite_begin(conn: Connection) -> None:
    # A write transaction takes the write lock up front: a deferred one that reads, then
    # writes, gets SQLITE_BUSY at the upgrade however long busy_timeout is.
    write = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# -- helpers ------------------------------------------------------------------------------


def driver_url(url: str | sa.URL) -> sa.URL:
    """The URL with the driver gembatch ships: psycopg 3 for a bare `postgresql://`."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def _iso(epoch: float) -> str:
    """UTC ISO 8601, fixed width (microseconds always), so text order is time order."""
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="microseconds")


def _time_column(value: Any) -> str | None:
    try:
        epoch = parse_time(value)
        return _iso(epoch) if epoch is not None else None
    except (OverflowError, OSError, ValueError):
        return None


def _job_values(
    record: Record, stored: Record, *, now: float, previous: _Row | None
) -> dict[str, Any]:
    """The columns of a job row, derived from its record (which stays the truth)."""
    status = record.get("status")
    status = status if isinstance(status, str) else ""  # the original tool's: no status
    finished = None
    if status in TERMINAL:
        finished = _time_column(record.get("completed_at"))
        if finished is None and previous is not None and previous.status in TERMINAL:
            finished = previous.finished_at
        finished = finished or _iso(now)
    user_id = record.get("user_id")
    priority = record.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int):
        priority = 0
    created = _time_column(record.get("created_at"))
    if created is None:
        created = previous.created_at if previous is not None else _iso(now)
    return {
        "user_id": user_id if isinstance(user_id, str) else None,
        "status": status,
        "priority": max(-_INT_MAX, min(_INT_MAX, priority)),
        "created_at": created,
        "updated_at": _iso(now),
        "finished_at": finished,
        "record": stored,
        "input_file": m.input_key(record),
        "batch_name": m.job_batch_name(record),
    }


def _event_rows(
    job_id: str, last_seq: int, events: Sequence[_EventLike], now: float
) -> list[dict[str, Any]]:
    """Rows for `events` numbered last_seq+1, +2, ...: the caller holds the job's row lock
    (SQLite: the write lock) and moves `jobs.last_seq` on in the same transaction."""
    at = _iso(now)
    return [
        {"job_id": job_id, "seq": last_seq + n, "type": e.type, "data": e.data, "created_at": at}
        for n, e in enumerate(events, 1)
    ]


def _task_values(job_id: str, idx: int, task: Any) -> dict[str, Any]:
    fields: dict[str, Any] = task if isinstance(task, dict) else {}
    batch = fields.get("batch")
    batch_name = batch.get("name") if isinstance(batch, dict) else None
    if not isinstance(batch_name, str) or not batch_name:
        batch_name = fields.get("batch_name")
    return {
        "job_id": job_id,
        "idx": idx,
        "state": _text(fields.get("state")),
        "display_name": _text(fields.get("display_name")),
        "batch_name": _text(batch_name),
        "record": task,
        "not_before": m.task_not_before(task),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _split(record: Record) -> tuple[Record, list[Any]]:
    """(the job's stored JSON, its tasks). A `tasks` list moves to the tasks table; an
    empty list keeps its place in the record so that key order survives the round trip."""
    tasks = record.get("tasks")
    if not isinstance(tasks, list):
        return record, []
    return {**record, "tasks": []}, tasks


def _normal(record: Record, was: Record | None = None) -> Record:
    """The record as the database will give it back (JSON types only); UnstorableRecord
    for what no database here can store and serve back as JSON. An update of a row that
    held such a value already (written by an older version) is let through as before:
    refusing it would stop the job for ever."""
    if was is not None:
        try:
            return _normal(record)
        except UnstorableRecord:
            try:
                _normal(was)
            except UnstorableRecord:
                return json.loads(json.dumps(record))
            raise
    try:
        text = json.dumps(record, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # fails on an unpaired surrogate
    except UnicodeEncodeError:
        raise UnstorableRecord(f"job {_shown_id(record)}: {_HALF_PAIR}") from None
    except ValueError as exc:  # NaN or Infinity: not JSON
        raise UnstorableRecord(f"job {_shown_id(record)}: {exc}") from None
    if _NUL_ESCAPE.search(text):
        raise UnstorableRecord(f"job {_shown_id(record)}: a value holds NUL (\\u0000)")
    return json.loads(text)


# `\u0000` where it is an escape: after an even run of backslashes (none counts).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_HALF_PAIR = "a string holds half of a UTF-16 surrogate pair (not a character)"


def _no_such_key(*keys: str | None) -> bool:
    """Keys no row can have (NUL: PostgreSQL text cannot hold it, and the query would
    fail); asked for, they are simply not found."""
    return any(key is not None and "\x00" in key for key in keys)


def _shown_id(record: Record) -> str:
    return repr(record.get("id"))[:80]


def _with_id(record: Record, job_id: str) -> Record:
    if record.get("id") == job_id:
        return record
    return {"id": job_id, **{key: value for key, value in record.items() if key != "id"}}


def _check_id(record: Record) -> None:
    if "id" in record and not (isinstance(record["id"], str) and record["id"]):
        raise ValueError(f'a job record\'s "id" must be a non-empty string, not {record["id"]!r}')


def _refusal(exc: InvalidTransition, reason: str | None = None) -> dict[str, Any]:
    detail = {"from": exc.current, "event": str(exc.event), "to": exc.target, "message": str(exc)}
    if reason is not None:
        detail["reason"] = reason
    return detail


def _stored(result: Any) -> list[StoredEvent]:
    return [StoredEvent(**row._mapping) for row in result]


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _remove_database_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", ".write.lock"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


__all__ = ["DEFAULT_BUSY_TIMEOUT", "TERMINAL", "Delivery", "SqlLedger", "StoredEvent"]
