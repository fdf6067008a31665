"""Seed 002's `batch_info` module, kept so scripts written against the original still work.

Why: users imported `batch_to_dict`, `AtomicJobManager` and friends from `batch_info` and
ran `batch_info.py job-info.jsonl`; the code now lives in `gembatch.ledger.jsonl` and the
command is `gembatch info`, and this module forwards both.
"""

from __future__ import annotations

import sys

from gembatch.ledger.jsonl import (
    AtomicJobManager,
    batch_to_dict,
    convert_job_if_needed,
    count_lines,
    get_batch_info,
)

__all__ = [
    "AtomicJobManager",
    "batch_to_dict",
    "convert_job_if_needed",
    "count_lines",
    "get_batch_info",
    "main",
]


def main(argv: list[str] | None = None) -> None:
    """`python -m gembatch.batch_info job-info.jsonl`: the same as `gembatch info`."""
    from gembatch.cli import main as cli_main

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["gembatch", "info", *args]
    cli_main()


if __name__ == "__main__":
    main()
