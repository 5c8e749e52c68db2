"""Unary-call load from several client processes (ghz is not in the registries here).

One Python process cannot load a gRPC server on the same two cores: its threads share one GIL and
the figure then measures the client. Each worker process here runs `concurrency` calls in flight
on its own grpc.aio channel (its own TCP connection), sending a pre-serialized request through a
generic method and keeping the response bytes unparsed, so a call costs the client as little as
grpc allows, on both sides of a ratio alike. Every worker reports its calls, errors and its own
CPU time, so a figure can tell the client's share of the machine from the servers'.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Job:
    """What every worker calls, and for how long (after `warmup` calls of its own). The calls in
    flight take the requests of `bodies` in turn, each its own: call k of worker w always sends
    bodies[(w * concurrency + k) % len(bodies)] (distinct resources, as many clients would ask)."""

    target: str
    method: str  # "/package.Service/Method"
    bodies: tuple[bytes, ...]
    metadata: Metadata
    seconds: float
    warmup: int = 20


@dataclass(frozen=True)
class Outcome:
    """One worker's share of a run."""

    calls: int
    errors: int
    elapsed: float
    cpu: float  # this worker's user + system CPU seconds during the timed part
    first_error: str


@dataclass(frozen=True)
class LoadResult:
    qps: float
    calls: int
    errors: int
    client_cpu: float  # all workers' CPU seconds during the timed part
    elapsed: float
    first_error: str


async def _run(job: Job, concurrency: int, index: int, go: float) -> Outcome:
    async with grpc.aio.insecure_channel(job.target) as ch:
        call = ch.unary_unary(job.method, None, None)  # no (de)serializers: bytes in, bytes out
        for k in range(job.warmup):
            await call(job.bodies[k % len(job.bodies)], metadata=job.metadata, timeout=30)
        counts = [0, 0]
        first: list[str] = []
        stop = False

        async def one(body: bytes) -> None:
            while not stop:
                try:
                    await call(body, metadata=job.metadata, timeout=30)
                    counts[0] += 1
                except grpc.aio.AioRpcError as e:
                    counts[1] += 1
                    if not first:
                        first.append(f"{e.code().name}: {e.details()}")

        await asyncio.sleep(max(0.0, go - time.time()))  # every worker starts at the same instant
        cpu0, t0 = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(one(job.bodies[(index * concurrency + k) % len(job.bodies)]))
                 for k in range(concurrency)]
        await asyncio.sleep(job.seconds)
        stop = True
        await asyncio.gather(*tasks)
        return Outcome(counts[0], counts[1], time.perf_counter() - t0, time.process_time() - cpu0,
                       first[0] if first else "")


def _worker(conn: Connection, concurrency: int, index: int) -> None:
    """A worker process: runs each (job, start time) it is sent, answers its Outcome."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        job, go = msg
        try:
            conn.send(asyncio.run(_run(job, concurrency, index, go)))
        except Exception as e:  # reported, so the figure becomes an error row rather than a hang
            conn.send(Outcome(0, 1, 0.0, 0.0, f"{type(e).__name__}: {e}"))


class LoadGenerator:
    """`processes` worker processes (spawned, not forked: the parent holds gRPC channels), each
    with `concurrency` calls in flight. Reused across runs: start-up is paid once."""

    def __init__(self, processes: int, concurrency: int) -> None:
        self.processes, self.concurrency = processes, concurrency
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, concurrency, index), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)

    def run(self, job: Job) -> LoadResult:
        go = time.time() + 1.0 + 0.002 * job.warmup * self.concurrency  # after every worker's warm-up
        for c in self._conns:
            c.send((job, go))
        outs: list[Outcome] = []
        for c in self._conns:
            if not c.poll(job.seconds + 120):
                raise TimeoutError("a load worker did not answer")
            outs.append(c.recv())
        elapsed = max(o.elapsed for o in outs)
        calls = sum(o.calls for o in outs)
        return LoadResult(qps=calls / elapsed if elapsed > 0 else 0.0, calls=calls,
                          errors=sum(o.errors for o in outs), client_cpu=sum(o.cpu for o in outs),
                          elapsed=elapsed, first_error=next((o.first_error for o in outs if o.first_error), ""))

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
