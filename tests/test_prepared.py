"""The delivery path's prepared statements (campaign_service/db/engine.py PreparedText): a `text()`
with named parameters becomes PREPARE/EXECUTE, prepared once per connection, kept across rollbacks,
and prepared again after PostgreSQL lost it (a DISCARD, a pooler, a migration)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import exc, text

from campaign_service.db.engine import Database, PreparedText, execute_prepared

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
