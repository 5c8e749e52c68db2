"""One Redis round trip per event-loop tick for a worker's many lanes (auto-pipelining).

Every send of a lane costs a few Redis steps (the fence with the chip's pace, the release), each
its own round trip: a write syscall, a read and redis-py's per-call connection handling. With
thousands of lanes on one worker those round trips were the worker's largest cost (py-spy, 1,000
lanes at 1 s: ~30% of samples in redis-py's call path, 18% in the socket writes alone). Here the
steps that lanes start within the same tick leave together, as one pipeline, and each caller gets
its own reply (or its own error). Nothing changes for a lone lane: a batch of one is a plain call.

Each command is still its own atomic step on the server (EVALSHA of a script, or a GET); a pipeline
is not a transaction and none is needed: lanes never depend on each other's steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

# A tick's batch is cut into pipelines of at most this many commands (a huge pipeline would hold
# Redis, and every other client, for its whole run).
MAX_PIPELINE = 500

Cmd = tuple[Any, ...]
Orphan = Callable[[Any], None]  # called with the reply of a command whose caller was cancelled
Queued = tuple[Cmd, asyncio.Future[Any], Orphan | None]


async def run_script(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
                     batch: RedisBatch | None) -> Any:
    """script(keys, args): through `batch` when there is one, else a call of its own."""
    if batch is None:
        return await script(keys=keys, args=args)
    return await batch.script(script, keys, args)


_background: set[asyncio.Future[Any]] = set()


def spawn(aw: Awaitable[Any]) -> None:
    """Run `aw` in the background, referenced until it ends (its outcome is not awaited)."""
    fut = asyncio.ensure_future(aw)
    _background.add(fut)
    fut.add_done_callback(_background.discard)


async def run_script_undoable(script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
                              batch: RedisBatch | None, undo: Callable[[Any], Awaitable[Any] | None]) -> Any:
    """run_script(), for a script that registers something its caller must end (a send's in-flight
    token): when the caller is cancelled (arq aborting a lane at a stop) after the script left,
    `undo(reply)` runs once Redis has answered. Without it, the token of a send that never left
    held the campaign's next stop back until its expiry (17 s in `make bench`)."""
    def orphaned(reply: Any) -> None:
        if (aw := undo(reply)) is not None:
            spawn(aw)

    if batch is not None:  # no extra hop: the batch hands a cancelled caller's reply to `orphaned`
        return await batch.script(script, keys, args, orphan=orphaned)
    fut: asyncio.Future[Any] = asyncio.ensure_future(script(keys=keys, args=args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None
                              else orphaned(f.result()))
        raise


class RedisBatch:
    """The few commands lanes issue per send (scripts and GET), batched per loop tick."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queue: list[Queued] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pipelines = 0  # (diagnostics) pipelines sent, commands sent through them
        self.commands = 0

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any],
                     orphan: Orphan | None = None) -> Any:
        """EVALSHA of a registered script; loaded first when Redis lost it (a restart), as redis-py
        does (NOSCRIPT: the script did not run, so running it again is safe)."""
        try:
            return await self._submit(("EVALSHA", script.sha, len(keys), *keys, *args), orphan)
        except NoScriptError:
            script.sha = await self.redis.script_load(script.script)
            return await self._submit(("EVALSHA", script.sha, len(keys), *keys, *args), orphan)

    async def get(self, key: str) -> Any:
        return await self._submit(("GET", key))

    async def execute(self, *cmd: Any) -> Any:
        """Any single command (redis-py's reply conversion applies: HGETALL gives a dict)."""
        return await self._submit(cmd)

    def script_nowait(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """script() queued at once, without awaiting: for a step that must leave in this tick's
        pipeline even though its caller goes on (a send's release). NOSCRIPT falls back to script()."""
        out: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(f: asyncio.Future[Any]) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif (e := f.exception()) is not None:
                out.set_exception(e)
            else:
                out.set_result(f.result())

        def first(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and isinstance(f.exception(), NoScriptError):
                retry = asyncio.ensure_future(self.script(script, keys, args))  # loads it, runs it again
                self._tasks.add(retry)
                retry.add_done_callback(self._tasks.discard)
                retry.add_done_callback(settle)
            else:
                settle(f)

        self._submit(("EVALSHA", script.sha, len(keys), *keys, *args)).add_done_callback(first)
        return out

    def _submit(self, cmd: Cmd, orphan: Orphan | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((cmd, fut, orphan))
        if not self._scheduled:
            self._scheduled = True
            # The task's first step runs after every callback already due in this tick (like
            # call_soon did) and sends the pipeline itself: one loop iteration from a caller's step
            # to Redis instead of two (call_soon, then a task).
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for lo in range(MAX_PIPELINE, len(queue), MAX_PIPELINE):
            task = asyncio.ensure_future(self._run(queue[lo:lo + MAX_PIPELINE]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._run(queue[:MAX_PIPELINE])

    async def _run(self, batch: list[Queued]) -> None:
        try:
            if len(batch) == 1:
                cmd = batch[0][0]
                replies: list[Any] = [await self.redis.execute_command(*cmd)]
            else:
                async with self.redis.pipeline(transaction=False) as p:
                    for cmd, _, _ in batch:
                        p.execute_command(*cmd)
                    replies = await p.execute(raise_on_error=False)
                self.pipelines += 1
                self.commands += len(batch)
        except Exception as e:  # the whole batch failed (connection lost beyond the retries)
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except BaseException:  # cancelled (shutdown): so are the callers' waits
            for _, fut, _ in batch:
                fut.cancel()
            raise
        for (_, fut, orphan), reply in zip(batch, replies, strict=True):
            if fut.done():  # its caller was cancelled; the step ran all the same
                if orphan is not None and not isinstance(reply, Exception):
                    orphan(reply)
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
