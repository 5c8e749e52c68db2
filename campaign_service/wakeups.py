"""The loops of the relay and the watch hub sleep on a coalescing wake-up: an asyncio.Event set by
the outbox listener (NOTIFY) or by the loop's own work, with a timeout as a safety net."""

from __future__ import annotations

import asyncio


async def woken(event: asyncio.Event, timeout: float) -> None:
    """Return once `event` is set or `timeout` seconds passed, with the event cleared: wake-ups
    that came meanwhile count as one."""
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout)
    except TimeoutError:
        pass
    event.clear()
