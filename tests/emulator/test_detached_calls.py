"""A fault rule's `detached` calls go on after their client has gone: the emulator's way
to play a create still in flight inside Gemini after its sender gave up."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from gembatch.gemini.remote import Remote
from tests.conftest import wait_for

LINE = b'{"key": "a", "request": {"contents": [{"parts": [{"text": "x"}]}]}}\n'


@pytest.mark.parametrize("detached", [True, False])
def test_a_detached_create_is_made_after_its_client_gave_up_and_a_plain_one_is_not(
    emulator: Any, detached: bool
) -> None:
    rule = {"endpoint": "batches.create", "latency_ms": 1500, "detached": detached}
    emulator.set_config({"faults": {"rules": [rule]}})

    async def give_up() -> str:
        async with Remote(emulator.api_key, emulator.base_url, timeout=0.5) as remote:
            name = await remote.upload(io.BytesIO(LINE), len(LINE), "in")
            with pytest.raises(Exception) as gave_up:
                await remote.create_batch("models/gemini-2.5-flash-lite", name, "late")
            assert "Timeout" in type(gave_up.value).__name__
            return str((await remote.find_batches({"late"})).keys())

    assert asyncio.run(give_up()) == "dict_keys([])"  # not made yet, whatever comes next
    if detached:
        wait_for(lambda: emulator.stats()["creates_by_display_name"].get("late") == 1)
    else:
        # The call died with its connection: a listing well after its time shows nothing.
        emulator.set_config({"faults": {"rules": []}})
        wait_for(lambda: emulator.stats()["calls"].get("batches.create") == 1)
        with pytest.raises(AssertionError):
            wait_for(lambda: emulator.stats()["batches_created"], timeout=2.5)
