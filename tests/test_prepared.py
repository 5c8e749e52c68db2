"""The delivery path's prepared statements (campaign_service/db/engine.py PreparedText): a `text()`
with named parameters becomes PREPARE/EXECUTE, prepared once per connection, kept across rollbacks,
and prepared again after PostgreSQL lost it (a DISCARD, a pooler, a migration); and none of it when
turned off (a pooler in transaction mode)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import exc, text

from campaign_service.config import Settings
from campaign_service.db.engine import Database, Prepared, PreparedText, execute_prepared

ECHO = PreparedText.of("whago_test_echo", text(
    "SELECT CAST(:a AS int) % 5 AS m, CAST(:a AS int) + :b AS s, '{}'::jsonb AS j, CAST(:t AS text[]) AS t"))


def test_named_parameters_become_numbered_once_each_and_literal_percent_stays() -> None:
    assert ECHO.prepare_sql == ("PREPARE whago_test_echo AS SELECT CAST($1 AS int) % 5 AS m, CAST($1 AS int) + $2 AS s,"
                                " '{}'::jsonb AS j, CAST($3 AS text[]) AS t")
    assert str(ECHO.execute) == "EXECUTE whago_test_echo(:a, :b, :t)"
    assert str(PreparedText.of("whago_test_none", text("SELECT 1")).execute) == "EXECUTE whago_test_none"


@pytest.fixture()
def db(database_url: str) -> Iterator[Database]:
    d = Database(database_url, pool_size=1)  # one connection: every call below reuses it
    yield d
    d.dispose()


def _prepared_here(s: sa.orm.Session) -> list[str]:
    return list(s.execute(text("SELECT name FROM pg_prepared_statements WHERE name LIKE 'whago_test%'")).scalars())


def test_prepared_once_per_connection_kept_across_rollback_and_prepared_again_when_lost(db: Database) -> None:
    with pytest.raises(ZeroDivisionError), db.transaction() as s:
        assert execute_prepared(s, ECHO, {"a": 7, "b": 1, "t": "{x,y}"}).one() == (2, 8, {}, ["x", "y"])
        raise ZeroDivisionError  # rolls the transaction back
    with db.transaction() as s:
        assert _prepared_here(s) == ["whago_test_echo"]  # PREPARE is not undone by a rollback
        assert execute_prepared(s, ECHO, {"a": 12, "b": 0, "t": "{}"}).one()[:2] == (2, 12)
        s.execute(text("DEALLOCATE whago_test_echo"))  # lost behind the pool's back
    with pytest.raises(exc.DBAPIError, match="does not exist"), db.transaction() as s:
        execute_prepared(s, ECHO, {"a": 1, "b": 1, "t": "{}"})
    with db.transaction() as s:  # forgotten after the error: prepared again
        assert execute_prepared(s, ECHO, {"a": 3, "b": 4, "t": "{z}"}).one() == (3, 7, {}, ["z"])
        assert _prepared_here(s) == ["whago_test_echo"]


# Each counts the statements prepared on its own connection as it runs.
COUNT_PREPARED = PreparedText.of("whago_test_count", text(
    "SELECT CAST(:a AS int) + 1, (SELECT count(*) FROM pg_prepared_statements)"))
COUNT_PREPARED_READ = Prepared("whago_test_count_read",
                               "SELECT $1::int + 1, (SELECT count(*) FROM pg_prepared_statements), $2::text", 2)


@pytest.mark.parametrize("prepared", [True, False], ids=["on", "off"])
def test_prepared_statements_can_be_turned_off_for_a_transaction_mode_pooler(database_url: str,
                                                                           prepared: bool) -> None:
    """Behind a pooler in transaction mode each transaction may get another server connection, so a
    statement prepared on one is unknown on the next: WHAGO_DB_PREPARED_STATEMENTS=off makes the
    delivery path's statements, the threads' prepared reads and the event loop's asyncpg reads run
    as they are (asyncpg without its statement cache), with the same answers."""
    d = Database(database_url, pool_size=1, prepared=prepared)
    try:
        with d.transaction() as s:
            one, count = execute_prepared(s, COUNT_PREPARED, {"a": 1}).one()
        assert one == 2 and (count >= 1) is prepared
        row = d.fetch_one(COUNT_PREPARED_READ, 6, "x%")
        assert row is not None and row[0] == 7 and row[2] == "x%" and (row[1] >= 1) is prepared

        async def loop_reads() -> list[int]:
            await d.loop_reads.start()
            try:
                return [(await d.loop_reads.fetch_all("SELECT count(*) FROM pg_prepared_statements"))[0][0]
                        for _ in range(2)]
            finally:
                await d.loop_reads.close()

        assert (asyncio.run(loop_reads())[1] >= 1) is prepared  # the first run of the query cached it
    finally:
        d.dispose()


def test_prepared_statements_setting_reads_on_and_off_and_refuses_anything_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, want in (("", True), ("on", True), ("OFF", False), ("0", False), ("true", True)):
        monkeypatch.setenv("WHAGO_DB_PREPARED_STATEMENTS", raw)
        assert Settings().db_prepared_statements is want, raw
    monkeypatch.setenv("WHAGO_DB_PREPARED_STATEMENTS", "sometimes")
    with pytest.raises(ValueError, match="WHAGO_DB_PREPARED_STATEMENTS"):
        Settings()
