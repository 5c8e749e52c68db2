"""The thread pool that runs campaign_service's RPC handlers: a few hot threads, and more only
while those are all stuck.

Why not grpc's usual `ThreadPoolExecutor(32)`: the handlers hold the GIL except while they wait
for PostgreSQL. With 16 GetCampaigns in flight, 16 threads stay runnable, every query hands the
GIL to another thread and back, and the context switches cost more than the handler itself
(measured on 2 cores: 24-28 switches and ~500 us of server CPU per GetCampaign with 32 threads;
about 12 and ~390 us with 4). So work goes to the most recently idle thread (LIFO: the hot ones
stay hot, the others sleep), and at most `core_workers` threads are started for it.

A small pool alone would let a few long RPCs (an import stream, a 1M-contact Start) hold every
thread while quick calls queue behind them. A monitor therefore adds a thread whenever work has
waited `stall_seconds` with no thread taking any, up to `max_workers`; threads above the core
retire after `idle_seconds` without work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

_STOP = object()  # handed to an idle thread at shutdown


class _Idle:
    """A parked thread: it sleeps on `wake` (held) until a submitter hands it an item and releases it."""

    __slots__ = ("item", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: Any = None


_Item = tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class ElasticThreadPool(futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor (so grpc.server takes it as one) with its own scheduling; see the module
    docstring. Only the `concurrent.futures.Executor` API is provided: submit, map, shutdown."""

    def __init__(self, core_workers: int, max_workers: int, *, stall_seconds: float = 0.02,
                 idle_seconds: float = 30.0, thread_name_prefix: str = "rpc") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        super().__init__(max_workers=1, thread_name_prefix=thread_name_prefix)  # its own queue stays unused
        self._max_workers = max_workers
        self._core = max(1, min(core_workers, max_workers))
        self._stall = stall_seconds
        self._idle_seconds = idle_seconds
        self._prefix = thread_name_prefix
        self._mutex = threading.Lock()
        self._backlog: deque[_Item] = deque()
        self._idle: list[_Idle] = []  # parked threads, most recently parked last
        self._threads: set[threading.Thread] = set()
        self._taken = 0  # items started so far: the monitor's measure of progress
        self._spawned = 0
        self._closed = False
        self._watch = threading.Event()  # set while items wait with no idle thread
        self._monitor = threading.Thread(target=self._run_monitor, name=f"{thread_name_prefix}-monitor", daemon=True)
        self._monitor.start()

    # -- Executor API --------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        item: _Item = (future, fn, args, kwargs)
        with self._mutex:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                parked = self._idle.pop()
                parked.item = item
                self._taken += 1
                parked.wake.release()
                return future
            self._backlog.append(item)
            if len(self._threads) < self._core:
                self._spawn()
            else:
                self._watch.set()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._mutex:
            self._closed = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            for parked in self._idle:
                parked.item = _STOP
                parked.wake.release()
            self._idle.clear()
            threads = list(self._threads)
            self._watch.set()
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    # -- threads -------------------------------------------------------------------------------------

    @property
    def thread_count(self) -> int:
        with self._mutex:
            return len(self._threads)

    def _spawn(self) -> None:
        """Start one more worker thread (caller holds the mutex)."""
        self._spawned += 1
        t = threading.Thread(target=self._run_worker, name=f"{self._prefix}_{self._spawned}", daemon=True)
        self._threads.add(t)
        t.start()

    def _next(self, me: _Idle) -> Any:
        """The next item for this thread, or _STOP when it should exit (it is then deregistered)."""
        with self._mutex:
            if self._backlog:
                self._taken += 1
                return self._backlog.popleft()
            if self._closed:
                self._threads.discard(threading.current_thread())
                return _STOP
            self._idle.append(me)
        while not me.wake.acquire(timeout=self._idle_seconds):
            with self._mutex:
                if me.item is not None:  # handed work just as the wait timed out
                    break
                if len(self._threads) > self._core:
                    self._idle.remove(me)
                    self._threads.discard(threading.current_thread())
                    return _STOP
        item, me.item = me.item, None
        if item is _STOP:
            with self._mutex:
                self._threads.discard(threading.current_thread())
        else:
            me.wake.acquire(blocking=False)  # re-arm when the hand-off came after the timeout
        return item

    def _run_worker(self) -> None:
        me = _Idle()
        while True:
            item = self._next(me)
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            del item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the future, as ThreadPoolExecutor does
                future.set_exception(exc)
                del exc
            else:
                future.set_result(result)
                del result
            del future, fn, args, kwargs

    def _run_monitor(self) -> None:
        """Adds a thread when work waited a whole `stall` period and no thread took any of it."""
        while True:
            self._watch.wait()
            with self._mutex:
                if self._closed:
                    return
                seen = self._taken
            time.sleep(self._stall)
            with self._mutex:
                if self._closed:
                    return
                if not self._backlog:
                    self._watch.clear()
                elif self._taken == seen and len(self._threads) < self._max_workers:
                    self._spawn()
