"""asyncio helpers shared by the service's background loops.

Why: the engine worker and the event hub both sleep until a deadline unless they are
stopped or woken first. asyncio has no "wait for any of these events" call, and a
hand-made one must cancel and await its waiters, or each wait leaves a pending task.
"""

from __future__ import annotations

import asyncio
import contextlib


async def wait_any(*events: asyncio.Event | None, timeout: float) -> None:
    """Until one of `events` is set (None stands for none), or `timeout` seconds pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events if event is not None]
    if not waiters:
        await asyncio.sleep(timeout)
        return
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
