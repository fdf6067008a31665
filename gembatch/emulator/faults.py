"""Deterministic fault injection: errors, latency, failed/expired batches, cut downloads.

Why: retry logic is only trustworthy if it has met 429 storms, 5xx, slow calls and broken
downloads. Every decision here is a pure function of (seed, what, n-th occurrence), so a
failing test replays the same faults in the same order.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
from dataclasses import dataclass

from gembatch.emulator.config import FaultsConfig
from gembatch.emulator.wire import ApiError, resource_exhausted, server_error


def uniform(seed: int, tag: str, n: int) -> float:
    """A number in [0, 1) fixed by (seed, tag, n)."""
    digest = hashlib.sha256(f"{seed}:{tag}:{n}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Decision:
    latency_seconds: float = 0.0
    error: ApiError | None = None
    latency_after_seconds: float = 0.0
    detached: bool = False  # carried out even if the client goes away meanwhile


@dataclass
class Truncation:
    mode: str  # "abort" or "silent"
    fraction: float


class FaultInjector:
    def __init__(self, config: FaultsConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self._lock = threading.Lock()
        self._rule_calls = [0] * len(config.rules)
        self._downloads = 0

    def decide(self, endpoint: str) -> Decision:
        """What to do to this call of `endpoint`: added latency, and maybe an error."""
        decision = Decision(latency_seconds=self.config.latency_ms / 1000.0)
        with self._lock:
            for index, rule in enumerate(self.config.rules):
                if not fnmatch.fnmatchcase(endpoint, rule.endpoint):
                    continue
                n = self._rule_calls[index]
                self._rule_calls[index] = n + 1
                if rule.first is not None and n >= rule.first:
                    continue
                if uniform(self.seed, f"rule{index}:{endpoint}", n) >= rule.rate:
                    continue
                decision.latency_seconds += rule.latency_ms / 1000.0
                decision.latency_after_seconds += rule.latency_after_ms / 1000.0
                decision.detached = decision.detached or rule.detached
                if rule.status is not None and decision.error is None:
                    decision.error = _error_for(rule.status, rule.retry_after_seconds, rule.message)
        return decision

    def batch_outcome(self, sequence: int, display_name: str) -> str:
        """SUCCEEDED, FAILED or EXPIRED for the `sequence`-th batch created."""
        faults = self.config.batches
        if faults.match and faults.match not in (display_name or ""):
            return "SUCCEEDED"
        u = uniform(self.seed, "batch-outcome", sequence)
        if u < faults.fail_rate:
            return "FAILED"
        if u < faults.fail_rate + faults.expire_rate:
            return "EXPIRED"
        return "SUCCEEDED"

    def truncation(self) -> Truncation | None:
        """Whether this download of a generated file is cut short."""
        faults = self.config.downloads
        with self._lock:
            n = self._downloads
            self._downloads += 1
        if faults.truncate_first is not None:
            cut = n < faults.truncate_first
        else:
            cut = uniform(self.seed, "download", n) < faults.truncate_rate
        return Truncation(faults.mode, faults.fraction) if cut else None


def _error_for(status: int, retry_after: float | None, message: str | None) -> ApiError:
    if status == 429:
        return resource_exhausted(message, retry_after if retry_after is not None else 1.0)
    if status >= 500:
        error = server_error(status)
        if message:
            error.message = message
        if retry_after is not None:
            error.headers["Retry-After"] = str(round(retry_after))
        return error
    return ApiError(status, message or "Injected error.")
