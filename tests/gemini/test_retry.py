"""retry.decide / retry.backoff: pure answers to "retry? when?" (no servers, no clock)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gembatch.jobs import ErrorClass, RetryConfig
from gembatch.retry import backoff, decide

NO_JITTER = RetryConfig(retry_interval=30.0, backoff_factor=2.0, max_interval=1800.0, jitter=0.0)


def test_backoff_doubles_from_the_retry_interval_up_to_the_cap() -> None:
    assert [backoff(NO_JITTER, n) for n in range(1, 9)] == [
        30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1800.0, 1800.0,
    ]  # fmt: skip


def test_backoff_survives_huge_attempt_numbers() -> None:
    assert backoff(NO_JITTER, 10_000) == 1800.0


def test_backoff_jitter_stays_within_its_band_and_is_reproducible() -> None:
    config = RetryConfig(retry_interval=10.0, jitter=0.2)
    delays = [backoff(config, 1, random.Random(seed)) for seed in range(200)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert len(set(delays)) > 100  # actually jittered
    assert backoff(config, 2, random.Random(7)) == backoff(config, 2, random.Random(7))


@pytest.mark.parametrize("error_class", list(ErrorClass))
def test_only_configured_classes_are_retried(error_class: ErrorClass) -> None:
    decision = decide(RetryConfig(), error_class, attempt=1)
    expected = error_class in {
        ErrorClass.RATE_LIMITED,
        ErrorClass.SERVER_ERROR,
        ErrorClass.NETWORK,
        ErrorClass.TIMEOUT,
    }
    assert decision.retry is expected
    if not expected:
        assert decision.delay == 0
        assert decision.reason.startswith(f"{error_class.value} is")
        assert "not retried" in decision.reason or "never retried" in decision.reason


@pytest.mark.parametrize("error_class", [ErrorClass.INTERNAL, ErrorClass.CANCELLED])
def test_internal_and_cancelled_are_never_retried_even_when_listed(
    error_class: ErrorClass,
) -> None:
    config = RetryConfig(retry_on_errors=tuple(ErrorClass), max_attempts=10)
    decision = decide(config, error_class, attempt=1)
    assert not decision.retry
    assert decision.reason == f"{error_class.value} is never retried"


def test_expired_is_retried_when_the_config_lists_it() -> None:
    config = RetryConfig(retry_on_errors=(ErrorClass.EXPIRED,), jitter=0)
    decision = decide(config, ErrorClass.EXPIRED, attempt=1)
    assert decision.retry and decision.delay == 30.0


def test_attempts_are_exhausted_at_max_attempts() -> None:
    config = RetryConfig(max_attempts=3, jitter=0)
    assert decide(config, ErrorClass.NETWORK, attempt=1).retry
    second = decide(config, ErrorClass.NETWORK, attempt=2)
    assert second.retry and second.delay == 60.0
    assert second.reason == "NETWORK is retried (attempt 3 of 3) in 60 s"
    last = decide(config, ErrorClass.NETWORK, attempt=3)
    assert not last.retry and last.delay == 0
    assert last.reason == "attempts exhausted (3 of 3)"


def test_non_retryable_class_wins_over_exhausted_attempts() -> None:
    decision = decide(RetryConfig(max_attempts=1), ErrorClass.AUTH, attempt=5)
    assert decision.reason == "AUTH is not retried"


def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    config = RetryConfig(retry_interval=1.0, jitter=0)
    decision = decide(config, ErrorClass.RATE_LIMITED, attempt=1, retry_after=5)
    assert decision.retry and decision.delay == 5.0
    assert decision.reason == "RATE_LIMITED is retried (attempt 2 of 3) in 5 s; Retry-After 5 s"


def test_backoff_wins_when_longer_than_retry_after() -> None:
    config = RetryConfig(retry_interval=30.0, jitter=0)
    decision = decide(config, ErrorClass.RATE_LIMITED, attempt=1, retry_after=2)
    assert decision.delay == 30.0


def test_zero_retry_interval_retries_at_once() -> None:
    config = RetryConfig(retry_interval=0.0)
    decision = decide(config, ErrorClass.SERVER_ERROR, attempt=1)
    assert decision.retry and decision.delay == 0.0


@given(
    error_class=st.sampled_from(list(ErrorClass)),
    attempt=st.integers(min_value=0, max_value=10_000),
    max_attempts=st.integers(min_value=1, max_value=50),
    retry_interval=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    backoff_factor=st.floats(min_value=0, max_value=100, allow_nan=False),
    max_interval=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    jitter=st.floats(min_value=0, max_value=1, allow_nan=False),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_bounds_and_never_below_retry_after(
    error_class: ErrorClass,
    attempt: int,
    max_attempts: int,
    retry_interval: float,
    backoff_factor: float,
    max_interval: float,
    jitter: float,
    retry_after: float | None,
    seed: int,
) -> None:
    config = RetryConfig(
        max_attempts=max_attempts,
        retry_interval=retry_interval,
        backoff_factor=backoff_factor,
        max_interval=max_interval,
        jitter=jitter,
        retry_on_errors=tuple(ErrorClass),
    )
    decision = decide(config, error_class, attempt, retry_after, random.Random(seed))
    if not decision.retry:
        assert decision.delay == 0
        assert attempt >= max_attempts or error_class in (
            ErrorClass.INTERNAL,
            ErrorClass.CANCELLED,
        )
        return
    assert attempt < max_attempts
    base = min(max_interval, retry_interval * backoff_factor ** max(0, attempt - 1))
    low, high = base * (1 - jitter) * (1 - 1e-12), base * (1 + jitter) * (1 + 1e-12)
    jittered = low <= decision.delay <= high
    if retry_after is None:
        assert jittered
    else:  # the longer of the jittered backoff and the Retry-After
        assert decision.delay >= retry_after
        assert jittered or decision.delay == retry_after
