"""Process-wide settings of gembatch's commands.

Why: a poll of 1,000 jobs allocates hundreds of thousands of short-lived objects (SDK
responses, records, coroutines). With CPython's default thresholds the cyclic collector
ran dozens of times per cycle, its full collections walking every object the process
holds: 0.1 s of a 1.8 s poll cycle (bench/bench_poll.py). Objects that exist at start
(modules, the SDK's classes) are frozen out of collection and collections run less
often; reference counting still frees almost everything the moment it is unused.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 20)  # CPython's defaults: (700, 10, 10)


def tune_gc() -> None:
    """Call once, early, in a process that runs gembatch's engine, service or emulator."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
