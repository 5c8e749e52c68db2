"""Array literals (campaign_service.db.arrays) read back by PostgreSQL exactly as given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import text

from campaign_service.db import arrays
from campaign_service.db.engine import Database
from tests.test_delivery_fixtures import delivery_db

__all__ = ["delivery_db"]

AWKWARD = ["", "NULL", "null", " padded ", "a,b", "{braces}", 'say "hi"', "back\\slash", "\\\"", "tab\there",
           "line\nbreak", "olá — 😀", "3EB0A1B2C3D4E5F6A7B8C9", "x" * 500]


def test_text_elements_round_trip(delivery_db: Database) -> None:
    with delivery_db.read() as conn:
        got = conn.execute(text("SELECT CAST(:a AS text[])"), {"a": arrays.literal(AWKWARD)}).scalar_one()
    assert got == AWKWARD


def test_text_elements_without_escapes_round_trip(delivery_db: Database) -> None:
    """The one-join path (no element has a quote or a backslash) quotes every element all the same."""
    plain = [v for v in AWKWARD if '"' not in v and "\\" not in v]
    with delivery_db.read() as conn:
        got = conn.execute(text("SELECT CAST(:a AS text[]), CAST(:b AS text[])"),
                           {"a": arrays.literal(plain), "b": arrays.literal(("", ""))}).one()
    assert got[0] == plain and got[1] == ["", ""]


def test_none_is_null_and_an_empty_list_is_an_empty_array(delivery_db: Database) -> None:
    with delivery_db.read() as conn:
        got = conn.execute(text("SELECT CAST(:a AS text[]), CAST(:b AS int[])"),
                           {"a": arrays.literal(["x", None, "NULL"]), "b": arrays.int_literal([])}).one()
    assert got[0] == ["x", None, "NULL"] and got[1] == []


def test_integers_and_timestamps(delivery_db: Database) -> None:
    t = datetime(2026, 11, 25, 20, 5, 1, 123456, tzinfo=UTC)
    other = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3)))
    with delivery_db.read() as conn:
        ints, times = conn.execute(text("SELECT CAST(:i AS bigint[]), CAST(:t AS timestamptz[])"), {
            "i": arrays.int_literal([1, -2, 2**63 - 1]), "t": arrays.literal([t, None, other])}).one()
        stamps = conn.execute(text("SELECT CAST(:t AS timestamptz[])"),
                              {"t": arrays.timestamp_literal([t, None, other])}).scalar_one()
    assert ints == [1, -2, 2**63 - 1]
    assert times == [t, None, other]
    assert stamps == [t, None, other]
