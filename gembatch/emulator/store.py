"""The emulator's state: files, uploads, batches and counters in one SQLite file.

Why: a restarted emulator must still know every file and batch it handed out (tests kill
it on purpose), and tests need exact counts of what clients did (uploads, creates per
display name, deletes). Blobs live beside the database as plain files. Two things stay in
memory so a poll storm costs no disk writes and no table scans: per-call counters, flushed
in one transaction every fraction of a second (and before any read of them), and the
unfinished batches, which the quota check and the clock look at all the time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    display_name TEXT,
    mime_type TEXT,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    expiration_time REAL NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    file_id TEXT,
    display_name TEXT,
    mime_type TEXT,
    total_bytes INTEGER NOT NULL,
    received INTEGER NOT NULL,
    create_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    display_name TEXT,
    model TEXT NOT NULL,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    source_kind TEXT NOT NULL,
    input_file TEXT,
    request_count INTEGER NOT NULL,
    failing TEXT NOT NULL,
    estimated_tokens INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    pending_s REAL NOT NULL,
    running_s REAL NOT NULL,
    expire_s REAL NOT NULL,
    priority INTEGER,
    cancel_time REAL,
    final_state TEXT,
    end_time REAL,
    output_file TEXT,
    generated_successes INTEGER,
    generated_failures INTEGER,
    forced TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_time ON files(create_time, id);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches(create_time, id);
"""


@dataclass
class FileRow:
    id: str
    display_name: str | None
    mime_type: str | None
    size_bytes: int
    sha256: str | None
    create_time: float
    update_time: float
    expiration_time: float
    source: str
    state: str


@dataclass
class UploadRow:
    upload_id: str
    file_id: str | None
    display_name: str | None
    mime_type: str | None
    total_bytes: int
    received: int
    create_time: float


@dataclass
class BatchRow:
    id: str
    seq: int
    display_name: str | None
    model: str
    create_time: float
    update_time: float
    source_kind: str  # "file" or "inline"
    input_file: str | None
    request_count: int
    failing: str  # JSON list of input indices that will yield an error line
    estimated_tokens: int
    outcome: str  # SUCCEEDED, FAILED or EXPIRED (decided at create)
    pending_s: float
    running_s: float
    expire_s: float
    priority: int | None
    cancel_time: float | None
    final_state: str | None
    end_time: float | None
    output_file: str | None
    generated_successes: int | None
    generated_failures: int | None
    forced: str = "[]"  # JSON list of input indices forced to fail ([[emulator:fail-first]])

    def failing_indices(self) -> list[int]:
        return sorted(set(json.loads(self.failing)) | set(self.forced_indices()))

    def forced_indices(self) -> list[int]:
        indices: list[int] = json.loads(self.forced)
        return indices


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


# Named columns in field order: rows become dataclasses positionally, with no dict per row
# (listing 100 batches a call, that is most of the cost).
_FILE_COLUMNS = ", ".join(_columns(FileRow))
_BATCH_COLUMNS = ", ".join(_columns(BatchRow))


class Store:
    """Thread-safe access to the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.blob_dir = state_dir / "blobs"
        self.upload_dir = state_dir / "uploads"
        self.work_dir = state_dir / "work"
        for directory in (self.blob_dir, self.upload_dir, self.work_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            state_dir / "emulator.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "forced" not in columns:  # a state directory from an older emulator
            self._db.execute("ALTER TABLE batches ADD COLUMN forced TEXT NOT NULL DEFAULT '[]'")
        # Counts not yet written (see `count`), and every batch without a final state.
        self._pending_counts: dict[str, int] = {}
        self._unfinished: dict[str, BatchRow] = {
            r[0]: BatchRow(*r)
            for r in self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE final_state IS NULL"
            )
        }

    def close(self) -> None:
        with self._lock:
            self.flush_counts()
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- paths -------------------------------------------------------------------------
    def blob_path(self, file_id: str) -> Path:
        return self.blob_dir / file_id

    def upload_path(self, upload_id: str) -> Path:
        return self.upload_dir / f"{upload_id}.part"

    def batch_input_path(self, batch_id: str) -> Path:
        return self.work_dir / f"{batch_id}.input"

    def batch_partial_path(self, batch_id: str) -> Path:
        return self.work_dir / f"{batch_id}.output.partial"

    def inline_output_path(self, batch_id: str) -> Path:
        return self.work_dir / f"{batch_id}.inline-output.json"

    # -- counters ----------------------------------------------------------------------
    def incr(self, name: str, by: int = 1) -> int:
        """Add to a counter durably, now (creates, uploads, deletes: tests count them after
        a SIGKILL); returns the new value."""
        with self._lock:
            row = self._db.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value "
                "RETURNING value",
                (name, by),
            ).fetchone()
            return int(row[0])

    def count(self, name: str, by: int = 1) -> None:
        """Add to a counter in memory; written by the next `flush_counts` (every call
        would otherwise cost a disk write). Reads (`counters`) flush first, so they are
        exact; a SIGKILL loses at most the counts since the last flush."""
        with self._lock:
            self._pending_counts[name] = self._pending_counts.get(name, 0) + by

    def flush_counts(self) -> None:
        """Write the counts kept in memory, in one transaction."""
        with self._lock:
            if not self._pending_counts:
                return
            pending, self._pending_counts = self._pending_counts, {}
            with self.transaction() as db:
                db.executemany(
                    "INSERT INTO counters(name, value) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    list(pending.items()),
                )

    def counters(self) -> dict[str, int]:
        with self._lock:
            self.flush_counts()
            return {r["name"]: r["value"] for r in self._db.execute("SELECT * FROM counters")}

    def _insert(self, table: str, row: FileRow | UploadRow | BatchRow) -> None:
        """One row, every column (the caller holds the lock)."""
        cols = _columns(type(row))
        self._db.execute(
            f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [getattr(row, c) for c in cols],
        )

    # -- files -------------------------------------------------------------------------
    def insert_file(self, row: FileRow) -> None:
        with self._lock:
            self._insert("files", row)

    def get_file(self, file_id: str, now: float | None = None) -> FileRow | None:
        with self._lock:
            r = self._db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)
            ).fetchone()
        if r is None:
            return None
        row = FileRow(*r)
        if now is not None and row.expiration_time <= now:
            self.delete_file(file_id)
            return None
        return row

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            try:
                os.unlink(self.blob_path(file_id))
            except FileNotFoundError:
                pass
        return bool(deleted)

    def list_files(self, after: tuple[float, str] | None, limit: int, now: float) -> list[FileRow]:
        """Newest first; `after` is the (create_time, id) of the last item already seen."""
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    f"SELECT {_FILE_COLUMNS} FROM files WHERE expiration_time > ? "
                    "ORDER BY create_time DESC, id DESC LIMIT ?",
                    (now, limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_FILE_COLUMNS} FROM files WHERE expiration_time > ? AND "
                    "(create_time, id) < (?, ?) ORDER BY create_time DESC, id DESC LIMIT ?",
                    (now, after[0], after[1], limit),
                ).fetchall()
        return [FileRow(*r) for r in rows]

    def count_files(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM files").fetchone()[0])

    # -- uploads -----------------------------------------------------------------------
    def insert_upload(self, row: UploadRow) -> None:
        with self._lock:
            self._insert("uploads", row)

    def get_upload(self, upload_id: str) -> UploadRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
        return UploadRow(**dict(r)) if r else None

    def set_upload_received(self, upload_id: str, received: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE uploads SET received = ? WHERE upload_id = ?", (received, upload_id)
            )

    def delete_upload(self, upload_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
        try:
            os.unlink(self.upload_path(upload_id))
        except FileNotFoundError:
            pass

    # -- batches -----------------------------------------------------------------------
    def insert_batch(self, row: BatchRow) -> None:
        with self._lock:
            self._insert("batches", row)
            if row.final_state is None:
                self._unfinished[row.id] = replace(row)  # the caller keeps its own copy

    def get_batch(self, batch_id: str) -> BatchRow | None:
        with self._lock:
            row = self._unfinished.get(batch_id)
            return row if row is not None else self._select_batch(batch_id)

    def _select_batch(self, batch_id: str) -> BatchRow | None:
        with self._lock:
            r = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        return BatchRow(*r) if r else None

    def update_batch(self, batch_id: str, **values: Any) -> None:
        values.setdefault("update_time", time.time())
        assigns = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(
                f"UPDATE batches SET {assigns} WHERE id = ?", [*values.values(), batch_id]
            )
            self._refresh_unfinished(batch_id)

    def finalize_batch(self, batch_id: str, **values: Any) -> bool:
        """Set terminal fields once; False if another caller finalized it first."""
        values.setdefault("update_time", time.time())
        assigns = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            changed = self._db.execute(
                f"UPDATE batches SET {assigns} WHERE id = ? AND final_state IS NULL",
                [*values.values(), batch_id],
            ).rowcount
            self._refresh_unfinished(batch_id)
        return bool(changed)

    def delete_batch(self, batch_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,)).rowcount
            self._unfinished.pop(batch_id, None)
        return bool(deleted)

    def _refresh_unfinished(self, batch_id: str) -> None:
        """Keep the in-memory copy of an unfinished batch equal to its row (lock held)."""
        if batch_id not in self._unfinished:
            return
        row = self._select_batch(batch_id)
        if row is None or row.final_state is not None:
            del self._unfinished[batch_id]
        else:
            self._unfinished[batch_id] = row

    def list_batches(self, after: tuple[float, str] | None, limit: int) -> list[BatchRow]:
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches "
                    "ORDER BY create_time DESC, id DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE (create_time, id) < (?, ?) "
                    "ORDER BY create_time DESC, id DESC LIMIT ?",
                    (after[0], after[1], limit),
                ).fetchall()
        return [BatchRow(*r) for r in rows]

    def unfinished_batches(self) -> list[BatchRow]:
        """Every batch without a final state, from memory (no query). Like every row the
        store hands out, each is a snapshot: read it, never change it."""
        with self._lock:
            return list(self._unfinished.values())

    def count_unfinished(self) -> int:
        with self._lock:
            return len(self._unfinished)

    def unfinished_batch(self, batch_id: str) -> BatchRow | None:
        """The batch if it has no final state yet (from memory), else None."""
        with self._lock:
            return self._unfinished.get(batch_id)

    def batch_state_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT coalesce(final_state, 'ACTIVE') AS s, count(*) AS n FROM batches GROUP BY s"
            ).fetchall()
        return {r["s"]: r["n"] for r in rows}

    def wipe(self) -> None:
        with self._lock:
            for table in ("files", "uploads", "batches", "counters"):
                self._db.execute(f"DELETE FROM {table}")
            self._pending_counts.clear()
            self._unfinished.clear()
        for directory in (self.blob_dir, self.upload_dir, self.work_dir):
            for path in directory.iterdir():
                path.unlink(missing_ok=True)
