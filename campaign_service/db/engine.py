"""Engine and session factory (PostgreSQL through psycopg2).

Round trips are the cost of the hot read RPCs (a Get is ~0.1 ms of SQL), so:

- No `pool_pre_ping` (it cost BEGIN + `SELECT 1` per checkout). A checkout instead polls the
  socket without blocking: an idle PostgreSQL connection has nothing to read, so a readable socket
  means the server closed it (restart, admin kill, idle timeout) and the pool replaces it before
  use. A connection that dies silently still surfaces as OperationalError -> UNAVAILABLE (clients
  retry) and SQLAlchemy then invalidates the whole pool.
- `session()` (reads) runs the connection in autocommit for its duration: one round trip per
  statement, no BEGIN and no ROLLBACK. psycopg2 toggles autocommit client-side, with no query.
- `fetch_one()` serves hot single-row reads made from threads (WatchCampaign's snapshot) from a
  server-side prepared statement on a raw pooled connection: PostgreSQL skips parse and plan (~60 us
  of its CPU per call), and Python skips building a SQLAlchemy Connection and execution context.
  (GetCampaign and ListCampaigns read from the event loop instead: campaign_service/db/aio.py.)
- The delivery path's hot statements are PREPAREd once per connection too (`execute_prepared`).
  Prepared statements need each connection to be one PostgreSQL session: behind a pooler in
  transaction mode (PgBouncer's `pool_mode = transaction`), `Database(prepared=False)`
  (WHAGO_DB_PREPARED_STATEMENTS=off) runs every statement as it is, at the cost of parse and plan.
"""

from __future__ import annotations

import json
import re
import select
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import TextClause, create_engine, event, exc, text
from sqlalchemy.dialects.postgresql import psycopg2 as pg_psycopg2
from sqlalchemy.engine import Connection, Engine, Result
from sqlalchemy.orm import Session, sessionmaker

from campaign_service.db.aio import LoopReads
from campaign_service.db.stats import StatsKeeper


def _json_loads(doc: str | bytes) -> Any:
    """JSONB columns decoded with orjson (every leased message carries its contact's variables: the
    stdlib decoder was ~10% of a lease's Python time); what orjson refuses (integers beyond 64 bits)
    falls back to the stdlib."""
    try:
        return orjson.loads(doc)
    except orjson.JSONDecodeError:
        return json.loads(doc)


def _server_closed(dbapi_connection: Any) -> bool:
    """True when psycopg2 knows the connection is closed, or the server has sent something on an
    idle connection (its termination message, or EOF)."""
    if dbapi_connection.closed:
        return True
    try:
        poller = select.poll()
        poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    if _server_closed(dbapi_connection):
        raise exc.DisconnectionError("connection closed by the server")  # the pool retries with a new one


_PG = pg_psycopg2.dialect()
_PLAN_CHANGED = "0A000"  # feature_not_supported: "cached plan must not change result type"


@dataclass(frozen=True)
class Prepared:
    """A read statement (placeholders $1..$n) that each connection PREPAREs once, then EXECUTEs."""

    name: str
    sql: str
    nparams: int
    execute_sql: str = field(init=False)
    prepare_sql: str = field(init=False)
    plain_sql: str = field(init=False)  # the statement itself, %s placeholders (prepared statements off)

    def __post_init__(self) -> None:
        object.__setattr__(self, "execute_sql",
                           f"EXECUTE {self.name}({', '.join(['%s'] * self.nparams)})" if self.nparams
                           else f"EXECUTE {self.name}")
        object.__setattr__(self, "prepare_sql", f"PREPARE {self.name} AS {self.sql}")
        numbers = [int(n) for n in re.findall(r"\$(\d+)", self.sql)]
        if numbers != list(range(1, self.nparams + 1)):
            raise ValueError(f"{self.name}: placeholders must be $1..${self.nparams} once each, in order")
        object.__setattr__(self, "plain_sql", re.sub(r"\$\d+", "%s", self.sql.replace("%", "%%")))


def _prepared_names(fairy: Any) -> set[str]:
    """The statements this pooled connection has PREPAREd (kept with the DBAPI connection)."""
    names: set[str] = fairy.info.setdefault("prepared", set())
    return names


def _prepare_once(fairy: Any, cur: Any, name: str, prepare_sql: str) -> set[str]:
    """PREPARE on this connection unless it already was; returns the connection's prepared names."""
    names = _prepared_names(fairy)
    if name not in names:
        cur.execute(prepare_sql)  # no parameters: psycopg2 leaves the text as it is
        names.add(name)
    return names


@dataclass(frozen=True)
class PreparedText:
    """A hot statement of a delivery transaction (LeaseMessages, ReportDeliveries), written with
    named parameters like any `text()`, that each connection PREPAREs once and then EXECUTEs
    (`execute_prepared`): PostgreSQL skips parse and plan, which cost a lane's short lease more
    backend CPU (~0.5 of ~0.85 ms, measured) than running it. Rows come back as from `text()`."""

    name: str
    prepare_sql: str
    execute: TextClause
    plain: TextClause  # the statement itself (prepared statements off)

    @classmethod
    def of(cls, name: str, stmt: TextClause) -> PreparedText:
        compiled = str(stmt.compile(dialect=_PG))  # %(name)s placeholders, literal % doubled
        order: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in order:
                order.append(m.group(1))
            return f"${order.index(m.group(1)) + 1}"

        body = re.sub(r"%\((\w+)\)s", number, compiled).replace("%%", "%")
        args = f"({', '.join(f':{n}' for n in order)})" if order else ""
        return cls(name, f"PREPARE {name} AS {body}", text(f"EXECUTE {name}{args}"), stmt)


def execute_prepared(s: Session, stmt: PreparedText, params: dict[str, Any]) -> Result[Any]:
    """Run `stmt` in the session's transaction, PREPAREd first on this connection if it is not yet
    (PREPARE is not undone by a rollback). After an error the name is forgotten, so the next use
    prepares it again: a migration may have changed the plan's types."""
    fairy = s.connection().connection
    if fairy.info.get(_UNPREPARED):
        return s.execute(stmt.plain, params)
    prepared = _prepared_names(fairy)
    if stmt.name not in prepared:
        dbapi: Any = fairy.dbapi_connection
        cur = dbapi.cursor()
        try:
            _prepare_once(fairy, cur, stmt.name, stmt.prepare_sql)
        finally:
            cur.close()
    try:
        return s.execute(stmt.execute, params)
    except exc.DBAPIError:
        prepared.discard(stmt.name)
        raise


_UNPREPARED = "unprepared"  # pooled connection info: run Prepared/PreparedText statements as they are


def _mark_unprepared(dbapi_connection: Any, record: Any) -> None:
    record.info[_UNPREPARED] = True


def make_engine(url: str, pool_size: int = 20, prepared: bool = True, **options: Any) -> Engine:
    """`prepared=False`: no PREPARE on its connections (a pooler in transaction mode in front, which
    hands each transaction any server connection: a statement prepared on one is unknown on the next)."""
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800,
                           json_deserializer=_json_loads, **options)
    event.listen(engine, "checkout", _on_checkout)
    if not prepared:
        event.listen(engine, "connect", _mark_unprepared)
    return engine


class Database:
    """Owns the engine; `transaction()` is the unit of work (commit on success, rollback on error),
    `session()` is for reads (autocommit: each statement sees the latest committed data)."""

    def __init__(self, url: str, pool_size: int = 20, prepared: bool = True) -> None:
        self.engine = make_engine(url, pool_size, prepared)
        # Reads run on connections that stay in autocommit. Switching a pooled connection in and out
        # of autocommit for each read made psycopg2 send `SET default_transaction_isolation TO
        # DEFAULT` every time: one more round trip and statement per GetCampaign (11k per second
        # of `make bench` get), on top of the read itself.
        self.read_engine = make_engine(url, max(2, pool_size // 2), prepared, isolation_level="AUTOCOMMIT")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.stats = StatsKeeper(self.engine)
        #: Reads on the event loop (GetCampaign); opened by `await loop_reads.start()` on the loop.
        self.loop_reads = LoopReads(url, max(2, pool_size // 2), prepared)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A pooled connection in autocommit, for Core reads."""
        with self.read_engine.connect() as conn:
            yield conn

    def fetch_one(self, stmt: Prepared, *params: Any) -> tuple[Any, ...] | None:
        """The first row of a prepared read (in autocommit), as a plain tuple. Errors are raised as
        SQLAlchemy's (OperationalError etc.), like every other statement's."""
        try:
            fairy = self.read_engine.raw_connection()
        except self.engine.dialect.loaded_dbapi.Error as e:
            # The pool raises the driver's own error when it cannot connect (the database is down):
            # wrapped like a statement's, so it maps to UNAVAILABLE rather than INTERNAL.
            raise exc.DBAPIError.instance(stmt.execute_sql, params, e, self.engine.dialect.loaded_dbapi.Error,
                                          connection_invalidated=True) from e
        dbapi: Any = fairy.dbapi_connection
        try:
            cur = dbapi.cursor()
            try:
                if fairy.info.get(_UNPREPARED):
                    cur.execute(stmt.plain_sql, params)
                else:
                    self._execute_prepared_read(fairy, cur, stmt, params)
                row: tuple[Any, ...] | None = cur.fetchone()
                return row
            finally:
                cur.close()
        except self.engine.dialect.loaded_dbapi.Error as e:
            closed = bool(dbapi.closed)
            if closed:
                fairy.invalidate(e)
            raise exc.DBAPIError.instance(stmt.execute_sql, params, e, self.engine.dialect.loaded_dbapi.Error,
                                          connection_invalidated=closed) from e
        finally:
            fairy.close()

    def _execute_prepared_read(self, fairy: Any, cur: Any, stmt: Prepared, params: tuple[Any, ...]) -> None:
        _prepare_once(fairy, cur, stmt.name, stmt.prepare_sql)
        try:
            cur.execute(stmt.execute_sql, params)
        except self.engine.dialect.loaded_dbapi.Error as e:
            if getattr(e, "pgcode", None) != _PLAN_CHANGED:
                raise
            # A migration changed a column's type under the prepared plan: prepare it again.
            cur.execute(f"DEALLOCATE {stmt.name}")
            cur.execute(stmt.prepare_sql)
            cur.execute(stmt.execute_sql, params)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session for reads, on an autocommit connection."""
        with self.read() as conn, Session(bind=conn, expire_on_commit=False) as session:
            yield session

    def dispose(self) -> None:
        self.stats.stop()
        self.engine.dispose()
        self.read_engine.dispose()
