"""The event loop of the dispatcher's processes (worker, DispatcherService).

uvloop by default: the worker's hot path is small HTTP and Redis round trips, where the stock
selector loop's transports cost more CPU than the requests themselves. WHAGO_EVENT_LOOP=asyncio
selects the stock loop (to compare)."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def name() -> str:
    """"uvloop" or "asyncio", as configured and available."""
    if os.environ.get("WHAGO_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return "asyncio"
    return "uvloop"


def tune_gc() -> None:
    """Fewer cyclic-GC passes: the hot path allocates many short-lived objects per request (HTTP,
    protobuf), almost none of them in cycles, and the default gen-0 threshold (700) ran a collection
    every few messages. Objects alive at startup (modules, settings) are frozen out of the scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def new_loop() -> asyncio.AbstractEventLoop:
    if name() == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the configured loop."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


def install() -> asyncio.AbstractEventLoop:
    """Make a new configured loop the current one (for code that calls get_event_loop, like arq)."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    return loop
