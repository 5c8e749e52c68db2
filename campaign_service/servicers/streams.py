"""Client streams into thread work: the stream is read on the event loop and handed, message by
message, to a blocking job (one transaction, disk writes) running in a thread. A broken or cancelled
stream raises inside the job, so it rolls back and nothing is kept as if the upload were complete.

gRPC can hand a handler the end of a client stream that was in fact cancelled (RST_STREAM), the
cancellation surfacing a moment later: the job waits END_OF_STREAM_GRACE for it before it goes on."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from campaign_service import errors

END_OF_STREAM_GRACE = 0.05
_END, _BROKEN = object(), object()
M = TypeVar("M")
R = TypeVar("R")


async def into_thread(requests: AsyncIterator[M], job: Callable[[Iterator[M]], R], *, backlog: int,
                      nothing_kept: str) -> R:
    """Run job(messages) in a thread while `requests` is read; `nothing_kept` ends the Cancelled
    message ("nothing was imported"). Reading stops early once the job has finished (refused)."""
    loop = asyncio.get_running_loop()
    handoff: queue.SimpleQueue[Any] = queue.SimpleQueue()
    cancelled = threading.Event()

    def messages() -> Iterator[M]:
        while True:
            item = handoff.get()
            if item is _END:
                break
            if item is _BROKEN:
                raise errors.Cancelled(f"the client ended the stream early; {nothing_kept}")
            yield item
        if cancelled.wait(END_OF_STREAM_GRACE):  # raised inside the job's transaction: rollback
            raise errors.Cancelled(f"the client cancelled the upload; {nothing_kept}")

    work = loop.run_in_executor(None, job, messages())
    try:
        try:
            async for req in requests:
                while handoff.qsize() > backlog and not work.done():
                    await asyncio.sleep(0.002)  # the job is behind: read no further ahead
                if work.done():
                    break  # it already answered (refused): stop reading
                handoff.put(req)
        except Exception:
            handoff.put(_BROKEN)
        else:
            handoff.put(_END)
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        cancelled.set()
        handoff.put(_BROKEN)
        raise
