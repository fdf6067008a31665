"""One question, answered in one place: retry this failure? and when?

Why: retries scattered through the engine drift apart (one honours Retry-After, another
hammers a rate-limited API). `decide` takes a job's RetryConfig, the error's class and the
attempts made so far, and answers with a delay and a reason a person can read. Pure: no
clock, no I/O; the caller adds the delay to its own `now`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gembatch.jobs import ErrorClass, RetryConfig

# Never retried, whatever the config says: a bug does not fix itself, and a cancel was
# asked for.
NEVER_RETRIED = frozenset({ErrorClass.INTERNAL, ErrorClass.CANCELLED})


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay: float  # seconds from now; 0 when not retrying
    reason: str


def decide(
    config: RetryConfig,
    error_class: ErrorClass,
    attempt: int,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """Whether to try again after `attempt` attempts (1 after the first failure) failed
    with `error_class`, and after how long. A Retry-After hint is honoured: never sooner."""
    if error_class in NEVER_RETRIED:
        return Decision(False, 0.0, f"{error_class.value} is never retried")
    if error_class not in config.retry_on_errors:
        return Decision(False, 0.0, f"{error_class.value} is not retried")
    if attempt >= config.max_attempts:
        return Decision(False, 0.0, f"attempts exhausted ({attempt} of {config.max_attempts})")
    delay = backoff(config, attempt, rng)
    reason = (
        f"{error_class.value} is retried (attempt {attempt + 1} of {config.max_attempts})"
        f" in {_seconds(delay)}"
    )
    hint = _valid(retry_after)
    if hint is not None:
        delay = max(delay, hint)
        reason = (
            f"{error_class.value} is retried (attempt {attempt + 1} of {config.max_attempts})"
            f" in {_seconds(delay)}; Retry-After {_seconds(hint)}"
        )
    return Decision(True, delay, reason)


def backoff(config: RetryConfig, attempt: int, rng: random.Random | None = None) -> float:
    """min(max_interval, retry_interval * backoff_factor**(attempt-1)), times a jitter
    factor drawn from uniform(1-jitter, 1+jitter); never negative."""
    exponent = max(0, attempt - 1)
    try:
        base = config.retry_interval * config.backoff_factor**exponent
    except OverflowError:
        base = math.inf
    if math.isnan(base):  # 0 * inf
        base = 0.0
    base = min(config.max_interval, base)
    jitter = max(0.0, config.jitter)
    factor = (rng or random).uniform(1.0 - jitter, 1.0 + jitter) if jitter else 1.0
    return max(0.0, base * factor)


def _valid(retry_after: float | None) -> float | None:
    if retry_after is None or math.isnan(retry_after) or retry_after < 0:
        return None
    return float(retry_after)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 or value == int(value) else f"{value:.1f} s"
