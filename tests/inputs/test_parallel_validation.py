"""Many large input files are validated by several processes at once; the outcome must
be exactly what one process finds: the same inputs in the same order (counts, hashes,
task plans), and the same problems, with file and line, when some file is bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gembatch import inputs
from gembatch.inputs import InputInvalid, SplitLimits, validate_files


def write(path: Path, lines: int, bad_at: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for n in range(lines):
            if n == bad_at:
                out.write('{"key": "broken", "request": \n')
                continue
            text = f"{path.stem} question {n} " + "filler " * 20
            out.write(
                json.dumps({"key": f"k{n}", "request": {"contents": [{"parts": [{"text": text}]}]}})
                + "\n"
            )
    return path


def outcome(paths: list[Path], limits: SplitLimits) -> object:
    try:
        return [
            (i.display, i.count, i.sha256, i.size_bytes, i.tasks)
            for i in validate_files(paths, limits)
        ]
    except InputInvalid as exc:
        return ("invalid", [str(p) for p in exc.problems], exc.omitted, str(exc))


@pytest.mark.parametrize("bad", [False, True])
def test_validating_in_several_processes_finds_exactly_what_one_process_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: bool
) -> None:
    paths = [write(tmp_path / f"in{n}.jsonl", 300 + n, 7 if bad and n in (2, 5) else None)
             for n in range(8)]  # fmt: skip
    limits = SplitLimits(max_requests=100)
    monkeypatch.setattr(inputs, "PARALLEL_MIN_BYTES", 1 << 60)
    alone = outcome(paths, limits)
    monkeypatch.setattr(inputs, "PARALLEL_MIN_BYTES", 0)
    spread = outcome(paths, limits)
    assert spread == alone
    if bad:
        assert alone[0] == "invalid" and any("in2.jsonl:8:" in p for p in alone[1])  # type: ignore[index]
    else:
        assert len(alone) == 8 and all(len(item[4]) >= 3 for item in alone)  # type: ignore[arg-type]
