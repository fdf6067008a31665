"""The service's job records name their files relative to the data directory.

Why: a record holding absolute paths ties the database to one place on one disk. Moving
the data directory (a new disk, a restore onto another machine, servers that mount a
shared directory at different paths) made every unfinished job fail on the old path and
showed that path to users. So the SQL ledger, given the data directory, stores the paths
of a record relative to it (`DataDir.stored`) and resolves them against it when it hands
the record out (`DataDir.resolved`): the engine and the service keep working with real
paths, and the database moves with its data directory. Messages stored with a job name
files the same way, so no answer of the service shows where the server keeps them.
`relative_to_old_root` turns records written before that (absolute paths) into the
relative form (migration 5).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

Record = dict[str, Any]
Convert = Callable[[str], str]

JOB_PATHS = ("input_path", "result_file")  # a task's: `part_file` and `input.path`
SERVICE_DIRS = ("inputs", "results")  # the service's own, under the data directory


@dataclass(frozen=True)
class DataDir:
    """A data directory as the ledger sees it: `root` as given (made absolute) and
    `real`, with symlinks resolved (inputs are recorded resolved, results as given)."""

    root: str
    real: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> DataDir:
        return cls(os.path.abspath(path), os.path.realpath(path))

    def stored(self, record: Record) -> Record:
        """The record as stored: paths inside the data directory relative to it, and the
        data directory's place removed from messages."""
        return _convert(record, self._relative, self._scrub)

    def resolved(self, record: Record) -> Record:
        """The record as the engine uses it: relative paths made absolute under the data
        directory (absolute ones are left as they are)."""
        return _convert(record, self._absolute, None)

    def relative(self, path: str) -> str:
        """`path` (absolute, or relative to the working directory) relative to the data
        directory when it lies inside, else unchanged."""
        return self._relative(path)

    def absolute(self, path: str) -> str:
        return self._absolute(path)

    def _relative(self, path: str) -> str:
        full = os.path.abspath(path)
        for root in (self.root, self.real):
            inside = _inside(full, root)
            if inside is not None:
                return inside
        return path

    def _absolute(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def _scrub(self, text: str) -> str:
        for root in (self.root, self.real):
            text = _without_root(text, root)
        return text


def relative_to_old_root(record: Record, tasks: list[Any]) -> tuple[Record, list[Any]] | None:
    """A record written when records held absolute paths, in the relative form; None when
    it is not one (nothing to change, or not in the service's layout).

    Where the data directory was is read from the record itself: every job the service
    created has its input at `<data dir>/inputs/<job id>.jsonl`, recorded resolved
    (absolute). Other paths of the job lie under that directory, absolute, or (a data
    directory given as a relative path) relative to the service's working directory then,
    i.e. ending in the data directory's own name(s) followed by `results/...`. A path that
    fits neither is left as it is: nothing is guessed."""
    root = _old_root(record)
    if root is None:
        return None

    def relative(path: str) -> str:
        if os.path.isabs(path):
            inside = _inside(os.path.normpath(path), root)
            return path if inside is None else inside
        return _relative_to_cwd_then(path, root)

    def scrub(text: str) -> str:
        return _without_root(text, root)

    new_record = _convert(record, relative, scrub)
    new_tasks = [_convert_task(task, relative, scrub) for task in tasks]
    if new_record == record and new_tasks == tasks:
        return None
    return new_record, new_tasks


# -- helpers ---------------------------------------------------------------------------------


def _convert(record: Record, path: Convert, message: Convert | None) -> Record:
    """A copy of `record` with `path` applied to its file paths (the job's and its
    tasks') and `message` to its messages; parts it does not change are shared."""
    out = dict(record)
    for name in JOB_PATHS:
        if isinstance(out.get(name), str) and out[name]:
            out[name] = path(out[name])
    if message is not None:
        if isinstance(out.get("message"), str):
            out["message"] = message(out["message"])
        if isinstance(out.get("error"), dict):
            out["error"] = _error(out["error"], message)
        if isinstance(out.get("errors"), list):
            out["errors"] = [_error(e, message) for e in out["errors"]]
    if isinstance(out.get("tasks"), list):
        out["tasks"] = [_convert_task(task, path, message) for task in out["tasks"]]
    return out


def _convert_task(task: Any, path: Convert, message: Convert | None) -> Any:
    if not isinstance(task, dict):
        return task
    out = dict(task)
    if isinstance(out.get("part_file"), str) and out["part_file"]:
        out["part_file"] = path(out["part_file"])
    source = out.get("input")
    if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
        out["input"] = {**source, "path": path(source["path"])}
    if message is not None and isinstance(out.get("error"), dict):
        out["error"] = _error(out["error"], message)
    return out


def _error(error: Any, message: Convert) -> Any:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return {**error, "message": message(error["message"])}
    return error


def _inside(path: str, root: str) -> str | None:
    """`path` relative to `root` (both absolute and normalised) when inside it."""
    if path == root:
        return "."
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not path.startswith(prefix):
        return None
    return PurePath(path[len(prefix) :]).as_posix()


def _without_root(text: str, root: str) -> str:
    """`<root>/inputs/x.jsonl` -> `inputs/x.jsonl`; `<root>` alone -> `the data directory`."""
    if root not in text:
        return text
    pattern = r"(?<![\w.~/-])" + re.escape(root.rstrip(os.sep)) + r"(/|(?![\w.-]))"
    return re.sub(pattern, lambda m: "" if m.group(1) else "the data directory", text)


def _old_root(record: Record) -> str | None:
    source, job_id = record.get("input_path"), record.get("id")
    if not isinstance(source, str) or not isinstance(job_id, str) or not os.path.isabs(source):
        return None
    path = Path(os.path.normpath(source))
    if path.name != f"{job_id}.jsonl" or path.parent.name != "inputs":
        return None
    return str(path.parent.parent)


def _relative_to_cwd_then(path: str, root: str) -> str:
    """`gembatch-data/results/x.jsonl` written by a service started with
    `--data-dir gembatch-data` in the directory above `root` -> `results/x.jsonl`."""
    parts = PurePath(path).parts
    tail = PurePath(root).parts
    for cut in range(len(parts)):
        if parts[cut] in SERVICE_DIRS and (cut == 0 or tuple(tail[-cut:]) == parts[:cut]):
            return PurePath(*parts[cut:]).as_posix()
    return path
