"""Campaign contacts. Imports go through COPY into a temp table and one INSERT ... SELECT ... ON
CONFLICT DO NOTHING, so a 1M-row import is a handful of statements."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.db.models import Contact

_TEMP = "whago_import"
# COPY text format escapes; NUL cannot be stored in PostgreSQL text, so it is dropped.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": ""})


def _raw_connection(session: Session) -> Any:
    """The psycopg2 connection under the session's transaction (for copy_expert)."""
    return session.connection().connection.dbapi_connection


def begin_import(session: Session) -> None:
    """A temp table for this transaction's staged rows (dropped at commit)."""
    session.execute(text(
        f"CREATE TEMP TABLE IF NOT EXISTS {_TEMP} (phone text, chat_id text, name text, variables jsonb,"
        " row_no bigint) ON COMMIT DROP"))
    session.execute(text(f"TRUNCATE {_TEMP}"))


def stage(session: Session, rows: Iterable[tuple[str, str, str, dict[str, str], int]]) -> int:
    """COPY normalized rows (phone, chat_id, name, variables, row_no) into the temp table."""
    return _copy(session, f"{_TEMP} (phone, chat_id, name, variables, row_no)", rows, "")


def _no_nul(variables: dict[str, str]) -> dict[str, str]:
    """jsonb rejects \\u0000: drop NUL characters from template variables."""
    return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in variables.items()}


def _copy(session: Session, target: str, rows: Iterable[tuple[str, str, str, dict[str, str], int]],
          prefix: str) -> int:
    """COPY rows in text format (tabs, newlines and backslashes escaped)."""
    parts: list[str] = []
    add = parts.append
    dumps = json.dumps
    for phone, chat, name, variables, row_no in rows:
        v = dumps(_no_nul(variables), ensure_ascii=False).translate(_ESCAPES) if variables else "{}"
        add(f"{prefix}{phone}\t{chat}\t{name.translate(_ESCAPES)}\t{v}\t{row_no}\n")
    if parts:
        cur = _raw_connection(session).cursor()
        try:
            cur.copy_expert(f"COPY {target} FROM STDIN", io.StringIO("".join(parts)))
        finally:
            cur.close()
    return len(parts)


def copy_direct(session: Session, campaign_id: uuid.UUID,
                rows: Iterable[tuple[str, str, str, dict[str, str], int]]) -> int:
    """COPY straight into campaign_contacts. Only for a campaign without contacts whose row the caller
    holds locked, with rows already deduplicated: nothing can conflict, so no staging is needed."""
    return _copy(session, "campaign_contacts (campaign_id, phone, chat_id, name, variables, row_no)", rows,
                 f"{campaign_id}\t")


def finish_import(session: Session, campaign_id: uuid.UUID) -> int:
    """Move the staged rows into campaign_contacts; rows whose phone exists are merged (skipped).
    Returns the number of new contacts."""
    result = session.execute(text(
        f"INSERT INTO campaign_contacts (campaign_id, phone, chat_id, name, variables, row_no)"
        f" SELECT :c, phone, chat_id, name, variables, row_no FROM {_TEMP} ORDER BY row_no"
        f" ON CONFLICT (campaign_id, phone) DO NOTHING"), {"c": campaign_id})
    return int(result.rowcount)  # type: ignore[attr-defined]


def max_row_no(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("SELECT coalesce(max(row_no), 0) FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).scalar_one())


def count(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("SELECT count(*) FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).scalar_one())


def page(session: Session, campaign_id: uuid.UUID, limit: int, after_id: int) -> list[Contact]:
    from sqlalchemy import select

    return list(session.execute(
        select(Contact).where(Contact.campaign_id == campaign_id, Contact.id > after_id)
        .order_by(Contact.id).limit(limit)).scalars())


def delete_all(session: Session, campaign_id: uuid.UUID) -> int:
    """One statement for all of the campaign's contacts."""
    return int(session.execute(text("DELETE FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).rowcount)  # type: ignore[attr-defined]
