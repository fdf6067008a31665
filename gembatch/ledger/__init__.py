"""The job ledger: where gembatch records every job it knows, and the contract it keeps.

Why: the engine must not care whether jobs live in `job-info.jsonl` (the CLI's ledger,
compatible with the original tool) or in SQL (the service's); both implement `Ledger`.

Contract for every implementation:

- A record is a JSON object (a `dict`); keys the implementation does not know are kept.
  Identity is the `id` field. A record written by the original tool has none: it gets
  `derive_id(record)` at load, stable across loads, and the id is stored the next time
  that record is written (`add`, or `update_many` with a changed record).
- Each method is one short transaction: lock, read the current state, work, write at most
  once, unlock. No lock is ever held across a network call or between two calls, so two
  processes (`submit` and `poll`) interleave freely and nothing one of them writes is lost.
- `add(record)` stores a new record; it returns False and writes nothing when a record
  with the same id exists.
- `update_many(records)` replaces whole records by id in ONE write and returns how many
  ids matched; records that did not change are not rewritten (a JSONL ledger writes their
  original bytes back), ids that match nothing are ignored.
- `find_by_*` return a copy of the first matching record, or None; mutating it changes
  nothing until it is passed to `update_many`.
- `load()` returns every record plus the problems found (a line that is not a record is
  reported with its 1-based line number and kept as it is, never dropped).
- Failing to get the lock within the timeout raises `LedgerLockedError` (a `UserError`
  naming the ledger, the lock and its holder); a ledger that cannot be read raises
  `LedgerFileError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gembatch.errors import UserError

Record = dict[str, Any]

LEGACY_ID_PREFIX = "legacy-"


@dataclass(frozen=True)
class LedgerProblem:
    """A ledger line gembatch cannot use: `message` says what is wrong and what to do."""

    line: int  # 1-based; 0 when the problem is not tied to a line
    message: str
    raw: bytes = b""


@dataclass
class LedgerSnapshot:
    """Every record of a ledger at one instant, in ledger order, and what was wrong."""

    records: list[Record]
    problems: list[LedgerProblem]
    # Optional detail a JSONL ledger can give: the line of each record (parallel to
    # `records`) and the ids that were derived at load rather than read from the file.
    lines: list[int] = field(default_factory=list)
    derived_ids: frozenset[str] = frozenset()


@runtime_checkable
class Ledger(Protocol):
    def load(self) -> LedgerSnapshot: ...

    def add(self, record: Record) -> bool: ...

    def update_many(self, records: Iterable[Record]) -> int: ...

    def find_by_input(self, input_file: str) -> Record | None: ...

    def find_by_batch(self, batch_name: str) -> Record | None: ...

    def find_by_id(self, job_id: str) -> Record | None: ...


class LedgerLockedError(UserError):
    """Another process held the ledger lock for longer than the timeout."""


class LedgerFileError(UserError):
    """The ledger path cannot be read or written (a directory, no permission, ...)."""


class UnstorableRecord(UserError, ValueError):
    """A record holds what a database cannot keep, or could not give back as JSON: NaN or
    Infinity, NUL (PostgreSQL text has none), half of a UTF-16 surrogate pair. The
    service refuses these at its edge; the SQL ledger refuses them again, and writes
    nothing, rather than fail inside the database."""


def derive_id(record: Record) -> str:
    """The stable id of a record written without one (by the original tool)."""
    input_file = record.get("input_file")
    name = _batch_name(record) or record.get("job_name") or ""
    text = f"{input_file if isinstance(input_file, str) else ''}\0{name}"
    return LEGACY_ID_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def record_id(record: Record) -> str:
    """The record's own `id` if it has a usable one, else its derived id."""
    value = record.get("id")
    if isinstance(value, str) and value:
        return value
    return derive_id(record)


def batch_names(record: Record) -> Iterator[str]:
    """Every remote batch name a record refers to: `batch.name` (or a v0.1.0 record's
    `job_name`), then each task's `batch.name`."""
    name = _batch_name(record)
    if name:
        yield name
    elif "batch" not in record and isinstance(record.get("job_name"), str):
        yield record["job_name"]
    tasks = record.get("tasks")
    if isinstance(tasks, list):
        for task in tasks:
            if isinstance(task, dict):
                name = _batch_name(task)
                if name:
                    yield name


def same_input_file(a: object, b: object) -> bool:
    """`./a.jsonl` and `a.jsonl` name the same input."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return a == b or os.path.normpath(a) == os.path.normpath(b)


def _batch_name(record: Record) -> str | None:
    batch = record.get("batch")
    if isinstance(batch, dict):
        name = batch.get("name")
        if isinstance(name, str) and name:
            return name
    return None


__all__ = [
    "LEGACY_ID_PREFIX",
    "Ledger",
    "LedgerFileError",
    "LedgerLockedError",
    "LedgerProblem",
    "LedgerSnapshot",
    "Record",
    "batch_names",
    "derive_id",
    "record_id",
    "same_input_file",
]
