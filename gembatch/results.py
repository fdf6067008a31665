"""Gemini's output files: verified key by key, merged across tasks and retries, joined to inputs.

Why: remote cleanup is only safe once every input key is accounted for, and at gigabytes a
full JSON parse per line would make that the bottleneck. So each line's key and outcome are
read from its bytes when it has a shape Gemini writes (`json.loads` for anything else), files
are streamed in big blocks, and joins find lines by offset instead of loading the file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from gembatch import fsutil
from gembatch.inputs import iter_keys, iter_line_chunks

MAX_LISTED = 20
READ_BLOCK = 1024 * 1024  # results are read in blocks of this size (see _SmallReads)
USAGE_FIELDS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "totalTokenCount",
    "cachedContentTokenCount",
)

# A result line's key and whether it is an error line (True) or a response (False).
Outcome = tuple[str, bool]


# -- reading one line (pure) -----------------------------------------------------------


def parse_result_line(line: bytes) -> Outcome | None:
    """(key, failed) of one whole output line; None when it is not a result line (no
    string `key`, or neither a `response` object nor a non-null `error`)."""
    return _fast_path(line, 0, len(line)) or _slow_path(line)


# A JSON string token (no raw control characters), its content still escaped.
_KEY = rb'"(?P<key>(?:[^"\\\x00-\x1f]|\\.)*)"'
_OUTCOME = rb'"(?P<outcome>response|error)": ?\{'
_END = rb"\}\r?\n?\Z"
_KEY_FIRST = re.compile(rb'\{"key": ?' + _KEY + rb", ?" + _OUTCOME + rb".*" + _END, re.DOTALL)
_KEY_LAST = re.compile(rb"\{" + _OUTCOME + rb'.*(?:,|, )"key": ?' + _KEY + _END, re.DOTALL)


def _fast_path(buf: bytes, pos: int, end: int) -> Outcome | None:
    """(key, failed) of the line in buf[pos:end], read straight from the bytes when it has
    a shape Gemini writes: `{"key":"...","response":{...}}`, `{"key":"...","error":{...}}`,
    or the same with the key last; with or without a space after ':' and ','. None means
    "not sure": parse it. Works in place, so a line is never copied.

    Only the ends of the line are examined (the regexes' `.*` skips the middle at C speed):
    a leading key is the first top-level member and the member right after it is
    top-level too; with the key last, the first member is top-level, and the rightmost
    `,"key":"..."}` that ends the line is the last top-level member (inside strings
    quotes are escaped). This agrees with json.loads on every line with unique member
    names and one of `response` or `error`: what a JSON serializer of Gemini's output
    writes."""
    match = _KEY_FIRST.match(buf, pos, end) or _KEY_LAST.match(buf, pos, end)
    if match is None:
        return None
    raw = match["key"]
    try:
        key = json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8")
    except ValueError:  # bad UTF-8: let json.loads judge the whole line
        return None
    return key, match["outcome"] == b"error"


def _slow_path(line: bytes) -> Outcome | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return classify_record(record)


def classify_record(record: Any) -> Outcome | None:
    """(key, failed) of a parsed output line: an `error` that is not null makes it failed;
    otherwise it needs a `response` object."""
    if not isinstance(record, dict):
        return None
    key = record.get("key")
    if not isinstance(key, str):
        return None
    if record.get("error") is not None:
        return key, True
    if isinstance(record.get("response"), dict):
        return key, False
    return None


# -- streaming a results file ------------------------------------------------------------


def _iter_results(path: Path) -> Iterator[tuple[int, int, memoryview, Outcome | None]]:
    """(1-based line number, file offset, the line with its newline, (key, failed) or
    None) for each non-blank line. A last line without a newline is always parsed in
    full: cut right after an inner '}', a line can look whole to the fast path."""
    lineno = 0
    with open(path, "rb") as handle:
        for buf, lo, hi, base in iter_line_chunks(_SmallReads(handle)):
            assert buf is not None
            view = memoryview(buf)
            pos = lo
            while pos < hi:
                stop = buf.find(b"\n", pos, hi) + 1 or hi
                lineno += 1
                if buf[stop - 1] == 0x0A:
                    parsed = _fast_path(buf, pos, stop)
                else:
                    parsed = None
                if parsed is None:
                    line = buf[pos:stop]
                    if line.isspace():
                        pos = stop
                        continue
                    parsed = _slow_path(line)
                yield lineno, base + pos, view[pos:stop], parsed
                pos = stop


class _SmallReads:
    """A binary file whose reads return at most READ_BLOCK bytes.

    The engine verifies a download in a worker thread, and glibc keeps the big blocks such
    a thread frees mapped in its arena: verifying a 1 GiB file with inputs' 8 MiB blocks
    raised the download process's peak RSS by ~20 MiB, with 1 MiB blocks by ~5 MiB, at
    the same speed (bench/bench_download.py)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(READ_BLOCK if size < 0 else min(size, READ_BLOCK))


def _keep(current: tuple[Any, bool] | None, failed: bool) -> bool:
    """Whether a later line with outcome `failed` replaces `current` (its payload, failed):
    a success replaces anything, an error only another error."""
    return current is None or not failed or current[1]


# -- verify ----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    lines: int = 0
    succeeded: int = 0
    failed: int = 0
    missing: list[str] = field(default_factory=list)  # expected keys not in the file (first 20)
    missing_count: int = 0
    unexpected: list[str] = field(default_factory=list)  # first 20
    duplicates: list[str] = field(default_factory=list)  # first 20
    unparseable: list[int] = field(default_factory=list)  # 1-based line numbers (first 20)
    torn: bool = False  # the file ends in a cut line
    expected: int = 0
    unexpected_count: int = 0
    duplicate_count: int = 0
    unparseable_count: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing_count
            or self.unexpected_count
            or self.duplicate_count
            or self.unparseable_count
            or self.torn
        )

    def describe(self) -> str:
        """One sentence for an error message or a log line."""
        if self.ok:
            return (
                f"results complete: {self.lines} lines, {self.succeeded} succeeded, "
                f"{self.failed} failed"
            )
        parts = []
        if self.missing_count:
            parts.append(
                f"{self.missing_count} of {self.expected} keys missing "
                f"({_preview(self.missing, self.missing_count)})"
            )
        if self.duplicate_count:
            parts.append(
                f"{self.duplicate_count} duplicate keys "
                f"({_preview(self.duplicates, self.duplicate_count)})"
            )
        if self.unexpected_count:
            parts.append(
                f"{self.unexpected_count} keys not in the input "
                f"({_preview(self.unexpected, self.unexpected_count)})"
            )
        if self.unparseable_count:
            lines = _preview([str(n) for n in self.unparseable], self.unparseable_count)
            parts.append(f"{self.unparseable_count} unreadable lines (line {lines})")
        if self.torn:
            parts.append("the file ends in the middle of a line (cut short)")
        return "results incomplete: " + "; ".join(parts)


def _preview(items: Sequence[str], total: int, show: int = 5) -> str:
    text = ", ".join(items[:show])
    return text + ", ..." if total > show else text


def _note(items: list[Any], value: Any) -> None:
    if len(items) < MAX_LISTED:
        items.append(value)


def verify_output(path: Path, expected_keys: Collection[str]) -> VerifyReport:
    """Account for every expected key in a downloaded output file, streaming it.

    A last line without its newline is accepted when it is a whole result line (only a cut
    that loses data makes the file torn)."""
    report = VerifyReport(expected=len(expected_keys))
    remaining = set(expected_keys)  # expected and not seen yet
    expected = (
        expected_keys if isinstance(expected_keys, set | frozenset | dict) else set(remaining)
    )
    remove = remaining.remove
    succeeded = failed_count = 0
    for lineno, _, line, parsed in _iter_results(path):
        if parsed is None:
            if line[-1] == 0x0A:
                report.unparseable_count += 1
                _note(report.unparseable, lineno)
            else:
                report.torn = True
            continue
        key, failed = parsed
        try:
            remove(key)
        except KeyError:
            _unexpected_or_duplicate(report, key, expected)
            continue
        failed_count += failed
        succeeded += not failed
    report.succeeded, report.failed = succeeded, failed_count
    report.lines = succeeded + failed_count + report.duplicate_count + report.unexpected_count
    report.missing_count = len(remaining)
    report.missing = list(_take_missing(expected_keys, remaining))
    return report


def _unexpected_or_duplicate(report: VerifyReport, key: str, expected: Collection[str]) -> None:
    if key in expected:
        report.duplicate_count += 1
        _note(report.duplicates, key)
    else:
        report.unexpected_count += 1
        _note(report.unexpected, key)


def _take_missing(expected: Collection[str], remaining: set[str]) -> Iterator[str]:
    """The first MAX_LISTED of `remaining`, in the caller's order of the expected keys."""
    if not remaining:
        return
    taken = 0
    for key in expected:
        if key in remaining:
            yield key
            taken += 1
            if taken == MAX_LISTED:
                return


# -- merge -----------------------------------------------------------------------------


@dataclass
class MergeSummary:
    lines: int = 0
    succeeded: int = 0
    failed: int = 0


def merge_results(parts: Sequence[Path], dest: Path) -> MergeSummary:
    """Merge verified output parts (task 0, task 1, ..., then retries) into one line per key.

    A key found in several parts keeps its line from the last part where it succeeded, else
    its last error line. Memory holds only the keys of parts after the first (retries hold
    failed keys only), not the lines. `dest` may be one of the parts: it is replaced
    atomically once everything is read (its directory is created if need be)."""
    winners = _later_winners(parts)
    summary = MergeSummary()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_writer(dest, "wb") as out:
        for index, part in enumerate(parts):
            for lineno, _, line, parsed in _iter_results(part):
                key, failed = _require(part, lineno, parsed)
                winner = winners.get(key)
                if winner is not None:
                    if index == 0 and not failed and winner[1]:
                        winners[key] = winner = ((0, lineno), False)  # beats later errors
                    if winner[0] != (index, lineno):
                        continue
                out.write(line)
                if line[-1] != 0x0A:  # a part's last line without its newline
                    out.write(b"\n")
                summary.lines += 1
                summary.failed += failed
                summary.succeeded += not failed
    return summary


def _later_winners(parts: Sequence[Path]) -> dict[str, tuple[tuple[int, int], bool]]:
    """For each key in parts[1:], where its kept line is: ((part index, line number), failed)."""
    winners: dict[str, tuple[tuple[int, int], bool]] = {}
    for index, part in enumerate(parts[1:], 1):
        for lineno, _, _, parsed in _iter_results(part):
            key, failed = _require(part, lineno, parsed)
            if _keep(winners.get(key), failed):
                winners[key] = ((index, lineno), failed)
    return winners


def _require(part: Path, lineno: int, parsed: Outcome | None) -> Outcome:
    if parsed is None:
        raise ValueError(f"{part}:{lineno}: not a result line; verify parts before merging them")
    return parsed


# -- small readers ---------------------------------------------------------------------


def failed_keys(path: Path) -> list[str]:
    """The keys of the error lines, in file order."""
    keys = []
    for _, _, _, parsed in _iter_results(path):
        if parsed is not None and parsed[1]:
            keys.append(parsed[0])
    return keys


def summarize_usage(path: Path) -> dict[str, int]:
    """The sum of each `usageMetadata` count over the response lines."""
    totals = dict.fromkeys(USAGE_FIELDS, 0)
    for _, _, line, parsed in _iter_results(path):
        if parsed is None or parsed[1]:
            continue
        try:
            record = json.loads(bytes(line))
        except (ValueError, RecursionError):  # read by the fast path, yet not JSON after all
            continue
        usage = _usage(record.get("response") if isinstance(record, dict) else None)
        for name in USAGE_FIELDS:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] += value
    return totals


def _usage(response: Any) -> dict[str, Any]:
    if not isinstance(response, dict):
        return {}
    usage = response.get("usageMetadata", response.get("usage_metadata"))
    return usage if isinstance(usage, dict) else {}


# -- join ------------------------------------------------------------------------------

CSV_COLUMNS = (
    "key",
    "status",
    "text",
    "finish_reason",
    "error_code",
    "error_message",
    "prompt_tokens",
    "output_tokens",
    "total_tokens",
)


@dataclass
class JoinSummary:
    succeeded: int = 0
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def key_outcomes(path: Path) -> dict[str, bool]:
    """key -> failed, for every result line (a success beats an error)."""
    outcomes: dict[str, bool] = {}
    for _, _, _, parsed in _iter_results(path):
        if parsed is not None:
            key, failed = parsed
            outcomes[key] = outcomes.get(key, True) and failed
    return outcomes


def index_results(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (offset, length) of its line; a success beats an error, a later line an
    earlier one (the same rule as merge_results)."""
    index: dict[str, tuple[tuple[int, int], bool]] = {}
    for _, offset, line, parsed in _iter_results(path):
        if parsed is not None and _keep(index.get(parsed[0]), parsed[1]):
            index[parsed[0]] = ((offset, len(line)), parsed[1])
    return {key: place for key, (place, _) in index.items()}


def join_record(key: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """One joined record: key, status, text, finish_reason, error, usage."""
    if record is None:
        return {
            "key": key,
            "status": "missing",
            "text": None,
            "finish_reason": None,
            "error": None,
            "usage": None,
        }
    error = record.get("error")
    if error is not None:
        return {
            "key": key,
            "status": "failed",
            "text": None,
            "finish_reason": None,
            "error": error if isinstance(error, dict) else {"message": str(error)},
            "usage": None,
        }
    response = record.get("response") or {}
    text, finish = _answer(response)
    return {
        "key": key,
        "status": "succeeded",
        "text": text,
        "finish_reason": finish,
        "error": None,
        "usage": _usage(response) or None,
    }


def _answer(response: dict[str, Any]) -> tuple[str | None, str | None]:
    """The text of candidate 0 (thought summaries left out) and why it ended; for a
    blocked prompt (no candidates), the block reason."""
    candidates = response.get("candidates") or []
    if not candidates or not isinstance(candidates[0], dict):
        feedback = response.get("promptFeedback") or response.get("prompt_feedback") or {}
        return None, feedback.get("blockReason") or feedback.get("block_reason")
    candidate = candidates[0]
    parts = (candidate.get("content") or {}).get("parts") or []
    texts = [
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
    ]
    finish = candidate.get("finishReason", candidate.get("finish_reason"))
    return ("".join(texts) if texts else None), finish


def _csv_row(joined: dict[str, Any]) -> list[Any]:
    error = joined["error"] or {}
    usage = joined["usage"] or {}
    output = None
    if "candidatesTokenCount" in usage or "thoughtsTokenCount" in usage:
        # Output as billed: the answer plus the thinking spent on it.
        output = usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)
    return [
        joined["key"],
        joined["status"],
        joined["text"],
        joined["finish_reason"],
        error.get("code"),
        error.get("message"),
        usage.get("promptTokenCount"),
        output,
        usage.get("totalTokenCount"),
    ]


def join_results(
    input_path: Path, result_path: Path | None, out: TextIO, fmt: str = "jsonl"
) -> JoinSummary:
    """Write one record per input line, in input order, to `out` (jsonl or csv).

    The results file is indexed by key (offsets only), and each line is read back with
    os.pread when its input line comes, so memory holds keys, never responses."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown format {fmt!r}; use jsonl or csv")
    have_results = result_path is not None and os.path.isfile(result_path)
    index = index_results(result_path) if have_results and result_path else {}
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    summary = JoinSummary()
    fd = os.open(result_path, os.O_RDONLY) if have_results and result_path else -1
    try:
        for key in iter_keys(input_path):
            place = index.get(key)
            record = None
            if place is not None:
                record = json.loads(os.pread(fd, place[1], place[0]))
            joined = join_record(key, record)
            if joined["status"] == "succeeded":
                summary.succeeded += 1
            elif joined["status"] == "failed":
                summary.failed.append(key)
            else:
                summary.missing.append(key)
            if writer is not None:
                writer.writerow(_csv_row(joined))
            else:
                out.write(json.dumps(joined, ensure_ascii=False) + "\n")
    finally:
        if fd >= 0:
            os.close(fd)
    return summary
