"""Reads served on the event loop (asyncpg), for the hottest read RPCs: GetCampaign, ListCampaigns.

Why not the RPC thread pool like every other unary RPC: there a call hops loop -> thread -> loop,
and while the thread waits for PostgreSQL psycopg2 hands the GIL to the loop and takes it back.
Profiled under `make bench` get load (py-spy --gil, /proc CPU), that cost ~0.4 ms of
campaign_service CPU per GetCampaign more than the trivial servicer, of which the query's own
Python was a few percent. asyncpg runs the query from the loop itself (binary protocol, each
statement prepared once per connection by its statement cache), so a read is one coroutine.

Only short, index-bound reads belong here: anything slow would hold up every RPC on the loop (a
list page of 100 campaigns is ~0.6 ms of Python to render; on a thread it held the GIL as long).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

#: What a read raises when PostgreSQL cannot be reached (down, restarting, connection dropped):
#: the interceptor answers UNAVAILABLE for these, as for SQLAlchemy's OperationalError.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset
    TimeoutError,  # asyncio's, since 3.11
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.CannotConnectNowError,  # starting up / shutting down
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, terminated backend
    asyncpg.ConnectionDoesNotExistError,  # the connection closed mid-query
    asyncpg.exceptions.TooManyConnectionsError,
)


def asyncpg_dsn(database_url: str) -> str:
    """The libpq form of a SQLAlchemy URL (postgresql+psycopg2://... -> postgresql://...)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query (`RESET ALL`, `UNLISTEN *`, ...): one
    more round trip per read, and these reads change no session state (autocommit, no SET)."""


class LoopReads:
    """An asyncpg pool opened lazily (min_size 0: no connection until the first read, so the
    service starts while PostgreSQL is still coming up). A connection that PostgreSQL closed is
    noticed by the loop as it happens and replaced at the next acquire.

    Besides the pool, one connection of its own serves the reads that find it free (GetCampaign's
    coalesced batches run one at a time, so they nearly always do): a pool acquire + release cost
    more Python than the query's own execute. Opened at its first read; closed on any failure or
    cancellation of a read on it (its state is then unknown) and opened again at the next."""

    def __init__(self, database_url: str, max_size: int, prepared: bool = True) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._max_size = max(1, max_size)
        # No statement cache behind a transaction-mode pooler (see Database): asyncpg then prepares
        # each statement unnamed, which lives no longer than the query.
        self._connect: dict[str, Any] = {} if prepared else {"statement_cache_size": 0}
        self._pool: asyncpg.Pool | None = None
        self._kept: asyncpg.Connection | None = None
        self._kept_busy = False

    async def start(self) -> None:
        if self._pool is None:
            # No idle-lifetime timer: asyncpg arms one (call_later) at every release otherwise.
            self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=self._max_size, timeout=10,
                                                   reset=_keep_session, max_inactive_connection_lifetime=0,
                                                   **self._connect)

    async def fetch_all(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Every row of `sql` ($1..$n placeholders), as plain tuples."""
        if self._pool is None:
            raise RuntimeError("LoopReads used before start()")
        if self._kept_busy:
            return [tuple(r) for r in await self._pool.fetch(sql, *params)]
        self._kept_busy = True
        try:
            con = self._kept
            if con is None or con.is_closed():
                self._kept = None
                con = self._kept = await asyncpg.connect(self._dsn, timeout=10, **self._connect)
            try:
                return [tuple(r) for r in await con.fetch(sql, *params)]
            except BaseException:
                self._kept = None
                con.terminate()
                raise
        finally:
            self._kept_busy = False

    async def close(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            try:
                if self._kept_busy:  # the read in flight fails as its connection drops
                    raise ConnectionAbortedError
                await asyncio.wait_for(kept.close(), 5)
            except CONNECTION_ERRORS:
                kept.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except CONNECTION_ERRORS:
                pool.terminate()
