"""job-info.jsonl: the CLI's job ledger, one JSON object per line, shared by processes.

Why: the original tool locked with a bare `.tmp` file (stale forever after a crash),
replaced the ledger non-atomically, held the lock through whole uploads, and silently
dropped lines it could not parse. Here the lock is a kernel lock (`filelock`, released
when its holder dies) held for one read-modify-write, every write is an atomic,
fsynced replacement, and a line gembatch cannot read is kept byte for byte and reported.
Unchanged lines are written back as the exact bytes read, so files written by the
original tool (v0.1.0 and v0.3.x formats) stay as they were until a record changes.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import json
import logging
import os
import shlex
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from gembatch import fsutil
from gembatch.jobs import TASK_TERMINAL, InvalidTransition, JobStatus, legal_status_change
from gembatch.ledger import (
    LedgerFileError,
    LedgerLockedError,
    LedgerProblem,
    LedgerSnapshot,
    Record,
    batch_names,
    derive_id,
    record_id,
    same_input_file,
)

DEFAULT_TIMEOUT = 30.0
# Seed 002's retry interval, kept by AtomicJobManager. JsonlLedger polls faster because
# its locks are held for milliseconds: a 1 s poll would stall every contended call.
SEED_RETRY_INTERVAL = 1.0
DEFAULT_RETRY_INTERVAL = 0.02

OFFLINE_CONVERSION_NOTE = "v0.1.0-offline"

_log = logging.getLogger(__name__)


# -- serialisation -----------------------------------------------------------------------


# Same output as json.dumps(record, ensure_ascii=False), without building an encoder per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode
_ENCODE_ASCII = json.JSONEncoder().encode


def dumps_record(record: Record) -> bytes:
    """One ledger line (without its newline): readable UTF-8 JSON."""
    try:
        return _ENCODE(record).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a "\\ud800" escape) has no UTF-8 form
        return _ENCODE_ASCII(record).encode("ascii")


def copy_record(value: Any) -> Any:
    """A deep copy of a JSON value (much faster than `copy.deepcopy` on 10,000 records)."""
    if isinstance(value, dict):
        return {key: copy_record(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_record(item) for item in value]
    return value


# -- lines and the in-memory document ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Line:
    """One line of the file. Never mutated: a changed record gets a new `_Line`."""

    raw: bytes  # the exact bytes, without the "\n"
    record: Record | None = None  # as gembatch sees it (a derived id included); never mutated
    problem: str | None = None  # why the line is not a record; None for records and blanks
    derived: bool = False  # the id was derived at load, not read from the line


def _parse_line(raw: bytes) -> _Line:
    if not raw.strip():
        return _Line(raw)
    keep = "the line is kept as it is: fix or delete it by hand"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Line(
            raw,
            problem=f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); {keep}",
        )
    text = text.removeprefix("\ufeff")  # a BOM left by a Windows editor
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _Line(raw, problem=f"not valid JSON ({exc.msg} at column {exc.colno}); {keep}")
    except RecursionError:
        return _Line(raw, problem=f"JSON nested too deeply to read; {keep}")
    if not isinstance(value, dict):
        kind = type(value).__name__.replace("NoneType", "null")
        return _Line(raw, problem=f"a JSON {kind} is not a job record (an object); {keep}")
    if "id" in value:
        if not (isinstance(value["id"], str) and value["id"]):
            return _Line(raw, problem=f'field "id" must be a non-empty string; {keep}')
        return _Line(raw, value)
    return _Line(raw, {"id": derive_id(value), **value}, derived=True)


def _split_lines(data: bytes) -> list[bytes]:
    if not data:
        return []
    parts = data.split(b"\n")
    if data.endswith(b"\n"):
        parts.pop()
    return parts


def _with_id(record: Record, job_id: str) -> Record:
    if record.get("id") == job_id:
        return record
    return {"id": job_id, **{key: value for key, value in record.items() if key != "id"}}


def _check_id(record: Record) -> None:
    if "id" in record and not (isinstance(record["id"], str) and record["id"]):
        raise ValueError(f'a job record\'s "id" must be a non-empty string, not {record["id"]!r}')


class _Document:
    """The ledger's lines in file order, with the records indexed by id."""

    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self._index: dict[str, int] = {}
        # line position -> position of the first record with the same id; copied on write
        self._duplicates: dict[int, int] = {}
        for pos, line in enumerate(lines):
            if line.record is not None:
                first = self._index.setdefault(line.record["id"], pos)
                if first != pos:
                    self._duplicates[pos] = first

    def copy(self) -> _Document:
        """An independent document (lines are immutable, so sharing them is safe)."""
        other = _Document.__new__(_Document)
        other.lines = list(self.lines)
        other._index = dict(self._index)
        other._duplicates = self._duplicates
        return other

    def position(self, job_id: str) -> int | None:
        return self._index.get(job_id)

    def records(self) -> Iterator[tuple[int, Record]]:
        """(position, record) of each usable record; the record must not be mutated."""
        for pos, line in enumerate(self.lines):
            if line.record is not None and pos not in self._duplicates:
                yield pos, line.record

    def find(self, predicate: Callable[[Record], bool]) -> Record | None:
        for _, record in self.records():
            if predicate(record):
                return copy_record(record)
        return None

    def problems(self) -> list[LedgerProblem]:
        problems = []
        for pos, line in enumerate(self.lines):
            if line.problem is not None:
                problems.append(LedgerProblem(pos + 1, line.problem, line.raw))
            elif pos in self._duplicates:
                first = self._duplicates[pos] + 1
                message = (
                    f"duplicate id {line.record['id']!r} (first on line {first}); "  # type: ignore[index]
                    "this line is ignored and kept as it is: remove one of the two by hand"
                )
                problems.append(LedgerProblem(pos + 1, message, line.raw))
        return problems

    def snapshot(self) -> LedgerSnapshot:
        records, positions, derived = [], [], set()
        for pos, record in self.records():
            records.append(copy_record(record))
            positions.append(pos + 1)
            if self.lines[pos].derived:
                derived.add(record["id"])
        return LedgerSnapshot(records, self.problems(), positions, frozenset(derived))

    def set(self, pos: int, record: Record) -> bool:
        """Replace the record at `pos`, keeping its id; True if anything changed."""
        old = self.lines[pos]
        assert old.record is not None
        new = _with_id(record, old.record["id"])
        if new == old.record:
            return False
        raw = dumps_record(new)
        if raw == old.raw:
            return False
        # Parsing the line back (rather than copying `new`) keeps the document equal to
        # what the file will hold, even for values JSON does not round-trip (int keys).
        self.lines[pos] = _parse_line(raw)
        return True

    def append(self, record: Record) -> str:
        job_id = record_id(record)
        self.append_line(_parse_line(dumps_record(_with_id(record, job_id))))
        return job_id

    def append_line(self, line: _Line) -> None:
        pos = len(self.lines)
        if line.record is not None:
            first = self._index.setdefault(line.record["id"], pos)
            if first != pos:
                self._duplicates = {**self._duplicates, pos: first}
        self.lines.append(line)

    def to_bytes(self) -> bytes:
        if not self.lines:
            return b""
        return b"\n".join([line.raw for line in self.lines]) + b"\n"


_FINISHED = frozenset({"completed", "failed", "cancelled"})
_FINISHED_TASKS = frozenset(state.value for state in TASK_TERMINAL)


@dataclass
class ApplyResult:
    """What `JsonlLedger.apply` did: the records after the change, by id."""

    records: dict[str, Record] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    added: list[bool] = field(default_factory=list)  # transact's new records, as add_many


def _check_status_change(old: Record | None, new: Record) -> None:
    """The ledger's own guard: a record's `status` moves only along the transition table.
    Records the original tool wrote have no status; gembatch may give them one."""
    before, after = (old or {}).get("status"), new.get("status")
    if before is None or before == after:
        return
    try:
        old_status, new_status = JobStatus(before), JobStatus(after)
    except ValueError:
        raise InvalidTransition("job", before, "update", after) from None
    if not legal_status_change(old_status, new_status):
        raise InvalidTransition("job", before, "update", after)


# -- the lock ----------------------------------------------------------------------------


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    program = Path(argv[0])
    if program.name == "__main__.py":  # python -m <package>
        head = program.parent.name
    elif argv[0] in ("", "-c"):
        head = "python -c"
    else:
        head = program.name
    return shlex.join([head, *argv[1:]])[:300]


def _holder_info() -> bytes:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command_line(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8")


def _write_holder(fd: int) -> None:
    """filelock's on_acquired hook: record who holds the lock, for a waiter's message."""
    try:
        data = _holder_info()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
    except OSError:  # a lock file we may not write still locks; the holder just goes unnamed
        pass


def holder_lock(path: str | os.PathLike[str], timeout: float = 0) -> filelock.FileLock:
    """A kernel lock that records its holder (pid, command, time) in the lock file, as the
    ledger lock does; `read_lock_holder` reads it back for an error message."""
    return filelock.FileLock(
        path,
        timeout=timeout,
        fallback_to_soft=False,
        preserve_lock_file=True,
        on_acquired=_write_holder,
    )


def describe_lock_holder(path: str | os.PathLike[str]) -> str:
    """ "pid 1234, `gembatch poll`, since 12:01:02" (or "another process")."""
    return _describe_holder(read_lock_holder(path))[0]


def read_lock_holder(lock_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the current (or last) holder wrote into the lock file, if readable."""
    try:
        with open(lock_path, "rb") as handle:
            value = json.loads(handle.read(4096).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe_holder(holder: dict[str, Any] | None) -> tuple[str, int | None]:
    """("another gembatch command (pid 1234, `gembatch poll`, since 12:01:02)", 1234)."""
    if not holder or not isinstance(holder.get("pid"), int):
        return "another process (it did not record who it is)", None
    pid = holder["pid"]
    local = holder.get("host") == socket.gethostname()
    details = [f"pid {pid}" if local else f"pid {pid} on {holder.get('host')}"]
    command = holder.get("command")
    if isinstance(command, str) and command:
        details.append(f"`{command}`")
    since = holder.get("since")
    if isinstance(since, str) and since:
        details.append(f"since {_short_time(since)}")
    kind = "gembatch command" if str(command).startswith("gembatch") else "process"
    described = f"{kind} ({', '.join(details)})"
    if local and pid == os.getpid():
        return f"this same {described}, through another ledger object,", None
    if local and not _pid_alive(pid):
        # The recorded holder is gone (its lock went with it): the current one wrote nothing.
        return f"an unknown process (the last recorded holder, {described}, has exited)", None
    return f"another {described}", pid if local else None


def _short_time(iso: str) -> str:
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    now = datetime.datetime.now(moment.tzinfo)
    return moment.strftime("%H:%M:%S" if moment.date() == now.date() else "%Y-%m-%d %H:%M:%S")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


# -- the ledger --------------------------------------------------------------------------


class JsonlLedger:
    """`Ledger` over a job-info.jsonl file; every method is one short locked transaction.

    `writes` counts the files this object has written (tests and benchmarks use it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.lock_path = Path(f"{os.fspath(path)}.lock")
        self.timeout = float(timeout)
        self.retry_interval = float(retry_interval)
        self.writes = 0
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._file_lock: filelock.FileLock | None = None
        # The parsed file, keyed by its bytes rather than by (inode, size, mtime): a replaced
        # file can reuse the inode and the size within one coarse mtime tick, and a stale
        # hit would write back lost data. Reading the bytes costs far less than parsing
        # them; when the file did change, appended lines and unchanged lines are not parsed
        # again (see `_parse`).
        self._cached_bytes: bytes | None = None
        self._cached_document = _Document([])

    def __repr__(self) -> str:
        return f"JsonlLedger({os.fspath(self.path)!r})"

    # -- the Ledger interface --------------------------------------------------------------

    def load(self) -> LedgerSnapshot:
        with self._transaction(write=False) as doc:
            return doc.snapshot()

    def load_active(self) -> LedgerSnapshot:
        """Like `load`, without finished jobs (what the engine works on each cycle).
        Records without a status (the original tool's) count as active."""
        snapshot = self.load()
        keep = [r.get("status") not in _FINISHED for r in snapshot.records]
        return LedgerSnapshot(
            [r for r, k in zip(snapshot.records, keep, strict=True) if k],
            snapshot.problems,
            [n for n, k in zip(snapshot.lines, keep, strict=False) if k],
            snapshot.derived_ids,
        )

    def load_cleanup_pending(self) -> LedgerSnapshot:
        """Finished jobs with something remote still to delete (a finished task keeps
        `not_before`, when its cleanup is due, until all is gone)."""
        snapshot = self.load()
        keep = [
            r.get("status") in _FINISHED
            and any(
                isinstance(t, dict) and t.get("state") in _FINISHED_TASKS and t.get("not_before")
                for t in r.get("tasks") or []
            )
            for r in snapshot.records
        ]
        return LedgerSnapshot(
            [r for r, k in zip(snapshot.records, keep, strict=True) if k],
            [],
            [n for n, k in zip(snapshot.lines, keep, strict=False) if k],
            snapshot.derived_ids,
        )

    def add(self, record: Record) -> bool:
        _check_id(record)
        with self._transaction() as doc:
            if doc.position(record_id(record)) is not None:
                return False
            doc.append(record)
            self._write_document(doc)
            return True

    def update_many(self, records: Iterable[Record]) -> int:
        updates = list(records)
        for record in updates:
            _check_id(record)
        with self._transaction() as doc:
            matched = 0
            changed = False
            for record in updates:
                pos = doc.position(record_id(record))
                if pos is None:
                    continue
                _check_status_change(doc.lines[pos].record, record)
            for record in updates:
                pos = doc.position(record_id(record))
                if pos is None:
                    continue
                matched += 1
                changed = doc.set(pos, record) or changed
            if changed:
                self._write_document(doc)
            return matched

    def add_many(self, records: Iterable[Record]) -> list[bool]:
        """`add` for several records in one write; True for each record added."""
        new = list(records)
        for record in new:
            _check_id(record)
        with self._transaction() as doc:
            added = []
            for record in new:
                if doc.position(record_id(record)) is not None:
                    added.append(False)
                    continue
                doc.append(record)
                added.append(True)
            if any(added):
                self._write_document(doc)
            return added

    def apply(self, changes: Mapping[str, Callable[[Record], Record | None]]) -> ApplyResult:
        """Run each change on the CURRENT record of its id, under the lock, in one write.

        This is how concurrent writers (a `poll` and a `cancel`, say) never lose each
        other's updates: a change is a function of the freshest record, not a copy taken
        earlier. A change returns the new record (or None for "no change"); if it raises,
        that record is left as it was and the exception is returned in `errors`. A change
        of `status` that no transition allows raises `InvalidTransition`.
        """
        result = ApplyResult()
        with self._transaction() as doc:
            changed = False
            for job_id, change in changes.items():
                pos = doc.position(job_id)
                line = doc.lines[pos] if pos is not None else None
                if line is None or line.record is None:
                    result.missing.append(job_id)
                    continue
                current = copy_record(line.record)
                try:
                    new = change(current)
                    if new is None:
                        result.records[job_id] = copy_record(line.record)
                        continue
                    _check_status_change(line.record, new)
                except Exception as exc:
                    result.errors[job_id] = exc
                    continue
                changed = doc.set(pos, new) or changed  # type: ignore[arg-type]
                result.records[job_id] = copy_record(doc.lines[pos].record)  # type: ignore[index]
            if changed:
                self._write_document(doc)
        return result

    def transact(self, select: Callable[[list[Record]], Any]) -> ApplyResult:
        """Decide on changes from ALL current records, then apply them, under one lock.

        For decisions that depend on the whole ledger, such as claiming tasks only while
        fewer than N remote batches are live: no other process can claim in between.
        `select` returns a mapping of changes (as for `apply`), or `(changes, new_records)`
        to also add records in the same transaction (e.g. after a duplicate check).
        """
        with self.locked():
            outcome = select(self.load().records)
            changes, new_records = outcome if isinstance(outcome, tuple) else (outcome, [])
            result = self.apply(changes) if changes else ApplyResult()
            if new_records:
                result.added = self.add_many(new_records)
            return result

    def find_by_input(self, input_file: str) -> Record | None:
        with self._transaction(write=False) as doc:
            return doc.find(lambda record: same_input_file(record.get("input_file"), input_file))

    def find_by_batch(self, batch_name: str) -> Record | None:
        with self._transaction(write=False) as doc:
            return doc.find(lambda record: batch_name in batch_names(record))

    def find_by_id(self, job_id: str) -> Record | None:
        with self._transaction(write=False) as doc:
            pos = doc.position(job_id)
            if pos is None or doc.lines[pos].record is None:
                return None
            return copy_record(doc.lines[pos].record)

    # -- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *, write: bool = True) -> Iterator[None]:
        """Hold the ledger lock (reentrant within a thread).

        A reader that cannot create the lock file (read-only directory) reads without
        it: nobody can replace the ledger there either, and replacements are atomic.
        """
        self._after_fork()
        with self._mutex:
            if self.path.is_dir():  # checked first: the lock would go next to the directory
                raise self._file_error("read", IsADirectoryError(errno.EISDIR, "Is a directory"))
            if not write and not self.path.parent.is_dir():
                yield  # nothing to read, and a read must not create directories
                return
            lock = self._lock()
            try:
                lock.acquire()  # creates missing parent directories, for a first write
                held = True
            except filelock.Timeout:
                raise self._locked_error() from None
            except OSError as exc:
                if write or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise self._file_error("lock", exc) from None
                held = False
            try:
                yield
            finally:
                if held:
                    lock.release()

    def _lock(self) -> filelock.FileLock:
        if self._file_lock is None:
            self._file_lock = filelock.FileLock(
                self.lock_path,
                timeout=self.timeout,
                poll_interval=self.retry_interval,
                fallback_to_soft=False,
                preserve_lock_file=True,
                on_acquired=_write_holder,
            )
        return self._file_lock

    def _after_fork(self) -> None:
        # A FileLock (and a held mutex) cannot be used in a forked child; start afresh.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._mutex = threading.RLock()
            self._file_lock = None

    def _locked_error(self) -> LedgerLockedError:
        who, pid = _describe_holder(read_lock_holder(self.lock_path))
        stop = f" (kill {pid})" if pid is not None else ""
        return LedgerLockedError(
            f"{self.path} is locked: {who} holds {self.lock_path} and did not release it "
            f"within {self.timeout:g} s; wait for it to finish or stop it{stop}, then try again"
        )

    def _file_error(self, action: str, exc: OSError) -> LedgerFileError:
        if isinstance(exc, IsADirectoryError) or self.path.is_dir():
            return LedgerFileError(
                f"{self.path} is a directory, not a ledger file; give the path of a "
                "job-info.jsonl file"
            )
        reason = exc.strerror or str(exc)
        return LedgerFileError(
            f"cannot {action} {self.path}: {reason}; check the file and directory permissions"
        )

    # -- reading and writing under the lock ---------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Iterator[_Document]:
        with self.locked(write=write):
            yield self._read_document()

    def _read_document(self) -> _Document:
        """The current file as a document; call with the lock held."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise self._file_error("read", exc) from None
        if data != self._cached_bytes:
            self._remember(data, self._parse(data))
        return self._cached_document.copy()

    def _parse(self, data: bytes) -> _Document:
        old = self._cached_bytes
        if old and old.endswith(b"\n") and data.startswith(old):
            # Lines were only appended (the common case: `submit` added jobs): parse those.
            document = self._cached_document.copy()
            for raw in _split_lines(data[len(old) :]):
                document.append_line(_parse_line(raw))
            return document
        cache = {line.raw: line for line in self._cached_document.lines}
        lines = []
        for raw in _split_lines(data):
            line = cache.get(raw)
            lines.append(line if line is not None else _parse_line(raw))
        return _Document(lines)

    def _remember(self, data: bytes, document: _Document) -> None:
        self._cached_bytes = data
        self._cached_document = document

    def _write_document(self, doc: _Document) -> None:
        """Replace the file with `doc`; call with the lock held."""
        data = doc.to_bytes()
        try:
            fsutil.remove_stale_temps(self.path.parent, self.path.name)
            fsutil.atomic_write_bytes(self.path, data)
        except OSError as exc:
            raise self._file_error("write", exc) from None
        self.writes += 1
        self._remember(data, doc.copy())


# -- seed 002: batch_info ------------------------------------------------------------------


def _state_name(state: Any) -> str | None:
    if state is None:
        return None
    if isinstance(state, enum.Enum):
        name = state.name
    elif isinstance(state, str):
        name = str(state)
    else:
        name = str(getattr(state, "name", state))
    # Some API versions report BATCH_STATE_*; the SDK and the ledger use JOB_STATE_*.
    if name.startswith("BATCH_STATE_"):
        name = "JOB_STATE_" + name.removeprefix("BATCH_STATE_")
    return name


def _time_text(value: Any) -> str:
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_none=True)
    return value if isinstance(value, (dict, list, str, int, float, bool)) else str(value)


def batch_to_dict(batch_job: Any) -> dict[str, Any]:
    """The ledger's `batch` object for a google-genai `BatchJob` (seed 002)."""
    result: dict[str, Any] = {
        "name": getattr(batch_job, "name", None),
        "display_name": getattr(batch_job, "display_name", None),
        "model": getattr(batch_job, "model", None),
        "state": _state_name(getattr(batch_job, "state", None)),
    }
    for key in ("create_time", "update_time", "end_time"):
        value = getattr(batch_job, key, None)
        if value is not None:
            result[key] = _time_text(value)
    dest = getattr(batch_job, "dest", None)
    if dest is not None:
        result["dest"] = {"file_name": getattr(dest, "file_name", None)}
    error = getattr(batch_job, "error", None)
    if error is not None:  # the original dropped it, and with it the reason for a failure
        result["error"] = _plain(error)
    return result


def get_batch_info(client: Any, batch_name: str) -> dict[str, Any]:
    """Fetch a batch from the API (a network call) and return `batch_to_dict` of it."""
    return batch_to_dict(client.batches.get(name=batch_name))


def count_lines(filename: str | os.PathLike[str]) -> int:
    """The number of non-empty lines of a file: the request count of an input file."""
    count = 0
    with open(filename, "rb") as handle:
        for line in handle:
            if line.strip():
                count += 1
    return count


def is_legacy_record(job_info: Record) -> bool:
    """A v0.1.0 record (`job_name` at top level, no `batch`): converting it needs the API."""
    return "batch" not in job_info and isinstance(job_info.get("job_name"), str)


def _input_path(input_file: Any, base_dir: str | os.PathLike[str] | None) -> Path | None:
    if not isinstance(input_file, str) or not input_file:
        return None
    path = Path(input_file)
    if not path.is_file() and base_dir is not None and not path.is_absolute():
        beside = Path(base_dir) / path
        if beside.is_file():
            return beside
    return path


def _count_or_problem(
    input_file: Any, base_dir: str | os.PathLike[str] | None, report: Callable[[str], None]
) -> int | None:
    path = _input_path(input_file, base_dir)
    if path is None:
        report('no "input_file", so the request count is unknown; add "count" by hand if needed')
        return None
    try:
        return count_lines(path)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        report(
            f"cannot count the requests of input file {input_file} ({reason}); "
            '"count" is left out: restore the file (paths are relative to the working '
            "directory or the ledger's directory) or ignore this"
        )
        return None


def _api_error_text(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or str(exc)
    if code is not None:
        return f"{code} {status or ''}: {message}".replace("  ", " ")
    return f"{type(exc).__name__}: {message}"


def _what_to_do(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 400 <= code < 500 and code != 429:
        return "check GEMINI_API_KEY (and GOOGLE_GEMINI_BASE_URL if set), then run again"
    return "try again later"


def _is_gone(exc: Exception) -> bool:
    # 404: deleted (the original tool deleted batches once done); 403: not visible to this key.
    from google.genai import errors as genai_errors

    return isinstance(exc, genai_errors.ClientError) and exc.code in (403, 404)


def _api_errors() -> tuple[type[Exception], ...]:
    import httpx
    from google.genai import errors as genai_errors

    return (genai_errors.APIError, httpx.HTTPError, OSError, ValueError)


def convert_job_if_needed(
    client: Any,
    job_info: Record,
    *,
    problems: list[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
) -> Record | None:
    """The record in the current format, or None when it needs no conversion (seed 002).

    - current format with a non-zero `count`: None;
    - current format without `count` (or 0): `count` added from the input file;
    - legacy v0.1.0: `batch` fetched from the API (a network call). A batch the API no
      longer has (404/403: the original tool deleted finished batches) or `offline=True`
      gives a `batch` built from the legacy fields and `"converted_from": "v0.1.0-offline"`.

    Nothing here raises for a bad record: what could not be done is appended to
    `problems` (what is wrong; what to do) and the record is left as it was. Relative input
    paths are tried in the working directory, then in `base_dir` (the ledger's directory).
    """

    def report(message: str) -> None:
        if problems is None:
            _log.warning("%s", message)
        else:
            problems.append(message)

    if not is_legacy_record(job_info):
        if "batch" not in job_info and "tasks" not in job_info:
            return None  # not a submitted job (an intent, or a record of another kind)
        if job_info.get("count"):
            return None
        count = _count_or_problem(job_info.get("input_file"), base_dir, report)
        if count is None or count == job_info.get("count"):
            return None
        return _with_count(job_info, count)

    job_name = job_info["job_name"]
    batch: dict[str, Any] | None = None
    note: str | None = None
    if not offline:
        if client is None:
            report(
                f"legacy v0.1.0 record (batch {job_name}) needs the Gemini API to be "
                "converted; set GEMINI_API_KEY, or add --local to convert it from the "
                "record alone"
            )
            return None
        try:
            batch = get_batch_info(client, job_name)
        except _api_errors() as exc:
            if not _is_gone(exc):
                report(
                    f"cannot convert legacy v0.1.0 record: fetching batch {job_name} failed "
                    f"({_api_error_text(exc)}); it is left unconverted: {_what_to_do(exc)}"
                )
                return None
    if batch is None:
        batch = _batch_from_legacy(job_info)
        note = OFFLINE_CONVERSION_NOTE

    converted: Record = {"input_file": job_info.get("input_file")}
    count = _count_or_problem(job_info.get("input_file"), base_dir, report)
    if count is not None:
        converted["count"] = count
    if "uploaded_file_name" in job_info:
        converted["uploaded_file_name"] = job_info["uploaded_file_name"]
    converted["batch"] = batch
    for key, value in job_info.items():
        if key not in converted and key not in ("job_name", "display_name", "count"):
            converted[key] = value
    if note is not None:
        converted["converted_from"] = note
    return converted


def _batch_from_legacy(job_info: Record) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "name": job_info.get("job_name"),
        "display_name": job_info.get("display_name"),
    }
    for key, legacy_key in (
        ("state", "final_state"),
        ("create_time", "created_at"),
        ("end_time", "completed_at"),
    ):
        if job_info.get(legacy_key) is not None:
            batch[key] = job_info[legacy_key]
    return batch


def _with_count(job_info: Record, count: int) -> Record:
    """`job_info` with `count` placed right after `input_file`, as the seed's output has it."""
    result: Record = {}
    for key, value in job_info.items():
        if key == "count":
            continue
        result[key] = value
        if key == "input_file":
            result["count"] = count
    if "count" not in result:
        result["count"] = count
    return result


# -- seed 002: AtomicJobManager ------------------------------------------------------------


class AtomicJobManager:
    """Seed 002's ledger session: lock, load and convert on enter, write once on exit.

    Compatibility API for scripts written against the original `batch_info.py`. In write
    mode the lock is held for the whole `with` block (and conversions call the API under
    it), so keep the block short; gembatch's own commands use `JsonlLedger`, whose every
    call is its own millisecond transaction. In read-only mode the lock is held only while
    the file is read; conversions then happen in memory, outside it, and nothing is written.

    On exit the file is written once if any record was added, updated or converted, even
    when the block raised: those changes describe remote work that already happened.
    Records are compared with what was read, so an unchanged record keeps its exact bytes.
    `problems` lists lines that could not be read or converted (kept as they are).
    """

    def __init__(
        self,
        job_info_file: str | os.PathLike[str],
        client: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_interval: float = SEED_RETRY_INTERVAL,
        read_only: bool = False,
        *,
        offline: bool = False,
    ) -> None:
        self.job_info_file = os.fspath(job_info_file)
        self.client = client
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.read_only = read_only
        self.offline = offline
        self.jobs: list[Record] = []
        self.problems: list[LedgerProblem] = []
        self.derived_ids: frozenset[str] = frozenset()
        self._ledger = JsonlLedger(job_info_file, timeout=timeout, retry_interval=retry_interval)
        self._positions: list[int | None] = []
        self._document: _Document | None = None
        self._converted = False
        self._stack: contextlib.ExitStack | None = None

    @property
    def writes(self) -> int:
        return self._ledger.writes

    def __enter__(self) -> AtomicJobManager:
        self.jobs, self._positions, self.problems = [], [], []
        self._converted = False
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self._ledger.locked(write=not self.read_only))
            document = self._ledger._read_document()
            if self.read_only:
                stack.close()  # the read is done; conversions need no lock
            self._load(document)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        assert self._stack is not None
        with self._stack:
            if not self.read_only:
                self._save()

    def _load(self, document: _Document) -> None:
        self._document = document
        self.problems = document.problems()
        base_dir = self._ledger.path.parent
        derived = set()
        for pos, stored in document.records():
            record = copy_record(stored)
            if document.lines[pos].derived:
                derived.add(record["id"])
            messages: list[str] = []
            converted = convert_job_if_needed(
                self.client, record, problems=messages, base_dir=base_dir, offline=self.offline
            )
            self.problems.extend(
                LedgerProblem(pos + 1, m, document.lines[pos].raw) for m in messages
            )
            if converted is not None:
                self._converted = True
                record = converted
            self.jobs.append(record)
            self._positions.append(pos)
        self.problems.sort(key=lambda problem: problem.line)
        self.derived_ids = frozenset(derived)

    def _save(self) -> None:
        document = self._document
        assert document is not None
        changed = False
        for job, pos in zip(self.jobs, self._positions, strict=True):
            if pos is None:
                document.append(job)
                changed = True
            else:
                changed = document.set(pos, job) or changed
        if changed:
            self._ledger._write_document(document)

    # -- seed 002 methods -------------------------------------------------------------------

    def file_exists(self, filepath: str | os.PathLike[str]) -> bool:
        return os.path.exists(filepath)

    def get_all_jobs(self) -> list[Record]:
        return [copy_record(job) for job in self.jobs]

    def was_converted(self) -> bool:
        return self._converted

    def find_job_by_input_file(self, filename: str) -> Record | None:
        for job in self.jobs:
            if same_input_file(job.get("input_file"), filename):
                return job
        return None

    def find_job_by_batch_name(self, batch_name: str) -> Record | None:
        for job in self.jobs:
            if batch_name in batch_names(job):
                return job
        return None

    def add_job(self, job_record: Record) -> bool:
        """Add a job unless one with the same `input_file` (or id) exists."""
        self._check_writable()
        _check_id(job_record)
        if self.find_job_by_input_file(job_record.get("input_file")) is not None:
            return False
        new_id = record_id(job_record)
        if any(record_id(job) == new_id for job in self.jobs):
            return False
        self.jobs.append(job_record)
        self._positions.append(None)
        return True

    def update_job_by_batch_name(self, job_record: Record) -> bool:
        """Replace the job whose batch has the same name as `job_record["batch"]["name"]`."""
        self._check_writable()
        batch = job_record.get("batch")
        name = batch.get("name") if isinstance(batch, dict) else None
        if not name:
            return False
        for index, job in enumerate(self.jobs):
            if name in batch_names(job):
                if "id" not in job_record and "id" in job:
                    job_record = {"id": job["id"], **job_record}
                self.jobs[index] = job_record
                return True
        return False

    def bulk_update_jobs(self, job_list: Iterable[Record]) -> int:
        """Update each job by batch name; returns how many were found."""
        self._check_writable()
        return sum(1 for job in job_list if self.update_job_by_batch_name(job))

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(
                f"AtomicJobManager({self.job_info_file!r}) is read-only; open it with "
                "read_only=False to change jobs"
            )


__all__ = [
    "DEFAULT_RETRY_INTERVAL",
    "DEFAULT_TIMEOUT",
    "OFFLINE_CONVERSION_NOTE",
    "AtomicJobManager",
    "JsonlLedger",
    "batch_to_dict",
    "convert_job_if_needed",
    "copy_record",
    "count_lines",
    "dumps_record",
    "get_batch_info",
    "is_legacy_record",
    "read_lock_holder",
]
