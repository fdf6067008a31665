"""The emulator's state: files, uploads, batches and counters in one SQLite file.

Why: a restarted emulator must still know every file and batch it handed out (tests kill
it on purpose), and tests need exact counts of what clients did (uploads, creates per
display name, deletes). Blobs live beside the database as plain files.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
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
    generated_failures INTEGER
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
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

    def failing_indices(self) -> list[int]:
        return json.loads(self.failing)


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


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

    def close(self) -> None:
        with self._lock:
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
        with self._lock:
            row = self._db.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value "
                "RETURNING value",
                (name, by),
            ).fetchone()
            return int(row[0])

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {r["name"]: r["value"] for r in self._db.execute("SELECT * FROM counters")}

    # -- files -------------------------------------------------------------------------
    def insert_file(self, row: FileRow) -> None:
        cols = _columns(FileRow)
        with self._lock:
            self._db.execute(
                f"INSERT INTO files({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [getattr(row, c) for c in cols],
            )

    def get_file(self, file_id: str, now: float | None = None) -> FileRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if r is None:
            return None
        row = FileRow(**dict(r))
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
                    "SELECT * FROM files WHERE expiration_time > ? "
                    "ORDER BY create_time DESC, id DESC LIMIT ?",
                    (now, limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM files WHERE expiration_time > ? AND "
                    "(create_time < ? OR (create_time = ? AND id < ?)) "
                    "ORDER BY create_time DESC, id DESC LIMIT ?",
                    (now, after[0], after[0], after[1], limit),
                ).fetchall()
        return [FileRow(**dict(r)) for r in rows]

    def count_files(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM files").fetchone()[0])

    # -- uploads -----------------------------------------------------------------------
    def insert_upload(self, row: UploadRow) -> None:
        cols = _columns(UploadRow)
        with self._lock:
            self._db.execute(
                f"INSERT INTO uploads({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [getattr(row, c) for c in cols],
            )

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
        cols = _columns(BatchRow)
        with self._lock:
            self._db.execute(
                f"INSERT INTO batches({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [getattr(row, c) for c in cols],
            )

    def get_batch(self, batch_id: str) -> BatchRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return BatchRow(**dict(r)) if r else None

    def update_batch(self, batch_id: str, **values: Any) -> None:
        values.setdefault("update_time", time.time())
        assigns = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(
                f"UPDATE batches SET {assigns} WHERE id = ?", [*values.values(), batch_id]
            )

    def finalize_batch(self, batch_id: str, **values: Any) -> bool:
        """Set terminal fields once; False if another caller finalized it first."""
        values.setdefault("update_time", time.time())
        assigns = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            changed = self._db.execute(
                f"UPDATE batches SET {assigns} WHERE id = ? AND final_state IS NULL",
                [*values.values(), batch_id],
            ).rowcount
        return bool(changed)

    def delete_batch(self, batch_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,)).rowcount
        return bool(deleted)

    def list_batches(self, after: tuple[float, str] | None, limit: int) -> list[BatchRow]:
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    "SELECT * FROM batches ORDER BY create_time DESC, id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM batches WHERE create_time < ? OR "
                    "(create_time = ? AND id < ?) ORDER BY create_time DESC, id DESC LIMIT ?",
                    (after[0], after[0], after[1], limit),
                ).fetchall()
        return [BatchRow(**dict(r)) for r in rows]

    def unfinished_batches(self) -> list[BatchRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM batches WHERE final_state IS NULL").fetchall()
        return [BatchRow(**dict(r)) for r in rows]

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
        for directory in (self.blob_dir, self.upload_dir, self.work_dir):
            for path in directory.iterdir():
                path.unlink(missing_ok=True)
