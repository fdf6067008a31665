"""Looking for a batch by display name answers only from a complete listing: a listing
whose later page fails raises, it never returns what the pages before it held (a batch on
the lost page would look "not made", and be created and paid for again)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from gembatch.emulator.faults import uniform
from gembatch.gemini.remote import Remote

LINE = b'{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}}\n'
TAG = "rule0:batches.list"  # the emulator's draw for the first fault rule on batches.list


def _seed_failing_only_the_second_page() -> int:
    """A seed whose draws let the first batches.list call through and fail the second."""
    return next(
        seed
        for seed in range(10_000)
        if uniform(seed, TAG, 0) >= 0.5 and uniform(seed, TAG, 1) < 0.5
    )


def test_a_listing_that_fails_on_a_later_page_finds_nothing_and_raises(
    emulator_factory: Any,
) -> None:
    seed = _seed_failing_only_the_second_page()
    emulator = emulator_factory(
        {"seed": seed, "limits": {"page_size_max": 1}, "clock": {"pending_seconds": 60}}
    )

    async def run() -> tuple[dict[str, Any], int]:
        async with Remote(emulator.api_key, emulator.base_url) as remote:
            for name in ("first", "wanted"):  # listed newest first: `wanted` on page 1
                uploaded = await remote.upload(io.BytesIO(LINE), len(LINE), name)
                await remote.create_batch("models/gemini-2.5-flash-lite", uploaded, name)
            rule = {"endpoint": "batches.list", "status": 503, "rate": 0.5}
            emulator.set_config({"faults": {"rules": [rule]}})
            with pytest.raises(Exception) as failed:
                await remote.find_batches({"wanted", "first"})
            calls = emulator.stats()["calls"]["batches.list"]
            assert "503" in str(failed.value)
            emulator.set_config({"faults": {"rules": []}})
            return await remote.find_batches({"wanted", "first"}), calls

    found, calls = asyncio.run(run())
    assert calls == 2  # page 1 came back (with `wanted` on it); page 2 failed
    assert sorted(found) == ["first", "wanted"]
