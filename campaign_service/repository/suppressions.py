"""Suppression lists (numbers a user must not message), opt-out settings and applied inbound
opt-outs. Phones are E.164 digits (campaign_service.phones), like campaign_contacts.phone, so the
checks at Start and at each lease are index lookups on suppressions' primary key (user_id, phone)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from campaign_service.db import arrays
from campaign_service.states import MessageState as M

# SuppressionSource (suppression_service.proto).
MANUAL, IMPORT, OPT_OUT = 1, 2, 3
#: failure_reason of a message not sent because its number is suppressed.
OPTED_OUT = "OPTED_OUT"
DEFAULT_WORDS = ("SAIR", "PARAR", "STOP", "CANCELAR", "DESCADASTRAR")


@dataclass(frozen=True)
class SuppressionRow:
    phone: str
    source: int
    note: str
    created_at: datetime


@dataclass(frozen=True)
class OptOutSettingsRow:
    words: list[str]
    confirmation_text: str
    updated_at: datetime | None


def add(s: Session, user_id: uuid.UUID, phone: str, source: int, note: str) -> tuple[SuppressionRow, bool]:
    """The entry of `phone` and whether it was created now (an existing one is left as it is)."""
    row = s.execute(text(
        "INSERT INTO suppressions (user_id, phone, source, note) VALUES (:u, :p, :src, :note)"
        " ON CONFLICT (user_id, phone) DO NOTHING RETURNING phone, source, note, created_at"),
        {"u": user_id, "p": phone, "src": source, "note": note}).one_or_none()
    if row is not None:
        return SuppressionRow(*row), True
    existing = get(s, user_id, phone)
    assert existing is not None
    return existing, False


def add_many(s: Session, user_id: uuid.UUID, rows: Sequence[tuple[str, str]], source: int) -> int:
    """Insert (phone, note) rows (phones distinct), skipping those already suppressed; how many were new."""
    if not rows:
        return 0
    result = s.execute(text(
        "INSERT INTO suppressions (user_id, phone, source, note)"
        " SELECT :u, r.phone, :src, r.note"
        " FROM unnest(CAST(:phones AS text[]), CAST(:notes AS text[])) AS r(phone, note)"
        " ON CONFLICT (user_id, phone) DO NOTHING"),
        {"u": user_id, "src": source, "phones": arrays.literal(p for p, _ in rows),
         "notes": arrays.literal(n for _, n in rows)})
    return int(result.rowcount)  # type: ignore[attr-defined]


def get(s: Session, user_id: uuid.UUID, phone: str) -> SuppressionRow | None:
    row = s.execute(text("SELECT phone, source, note, created_at FROM suppressions WHERE user_id = :u AND phone = :p"),
                    {"u": user_id, "p": phone}).one_or_none()
    return None if row is None else SuppressionRow(*row)


def remove(s: Session, user_id: uuid.UUID, phone: str) -> bool:
    return bool(s.execute(text("DELETE FROM suppressions WHERE user_id = :u AND phone = :p"),
                          {"u": user_id, "p": phone}).rowcount)  # type: ignore[attr-defined]


def page(s: Session, user_id: uuid.UUID, query: str, source: int, limit: int, after: str | None
         ) -> list[SuppressionRow]:
    """Ordered by phone, after `after`; `query` (digits) matches anywhere in the phone."""
    cond = ""
    params: dict[str, object] = {"u": user_id, "lim": limit}
    if query:
        cond += " AND strpos(phone, :q) > 0"
        params["q"] = query
    if source:
        cond += " AND source = :src"
        params["src"] = source
    if after is not None:
        cond += " AND phone > :after"
        params["after"] = after
    rows = s.execute(text(f"SELECT phone, source, note, created_at FROM suppressions WHERE user_id = :u{cond}"
                          " ORDER BY phone LIMIT :lim"), params).all()
    return [SuppressionRow(*r) for r in rows]


def suppressed_contacts(s: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> list[int]:
    """Ids of the campaign's contacts whose number the user suppressed."""
    return list(s.execute(text(
        "SELECT ct.id FROM campaign_contacts ct JOIN suppressions sp ON sp.user_id = :u AND sp.phone = ct.phone"
        " WHERE ct.campaign_id = :c"), {"u": user_id, "c": campaign_id}).scalars())


def skip_contacts(s: Session, campaign_id: uuid.UUID, contact_ids: Sequence[int]) -> int:
    """Start: the PENDING messages of these contacts become SKIPPED (OPTED_OUT); how many."""
    if not contact_ids:
        return 0
    return int(s.execute(text(
        f"UPDATE campaign_messages SET state = {M.SKIPPED:d}, failure_reason = :r, updated_at = now()"
        f" WHERE campaign_id = :c AND state = {M.PENDING:d} AND contact_id = ANY(CAST(:ids AS bigint[]))"),
        {"c": campaign_id, "r": OPTED_OUT, "ids": arrays.int_literal(contact_ids)}).rowcount)  # type: ignore[attr-defined]


def settings(s: Session, user_id: uuid.UUID) -> OptOutSettingsRow:
    row = s.execute(text("SELECT words, confirmation_text, updated_at FROM opt_out_settings WHERE user_id = :u"),
                    {"u": user_id}).one_or_none()
    if row is None:
        return OptOutSettingsRow(list(DEFAULT_WORDS), "", None)
    return OptOutSettingsRow(list(row.words), row.confirmation_text, row.updated_at)


def save_settings(s: Session, user_id: uuid.UUID, words: Sequence[str], confirmation_text: str) -> OptOutSettingsRow:
    row = s.execute(text(
        "INSERT INTO opt_out_settings (user_id, words, confirmation_text, updated_at)"
        " VALUES (:u, CAST(:w AS text[]), :t, now())"
        " ON CONFLICT (user_id) DO UPDATE SET words = EXCLUDED.words, confirmation_text = EXCLUDED.confirmation_text,"
        " updated_at = now() RETURNING words, confirmation_text, updated_at"),
        {"u": user_id, "w": arrays.literal(words), "t": confirmation_text}).one()
    return OptOutSettingsRow(list(row.words), row.confirmation_text, row.updated_at)


def claim_inbound(s: Session, waha_message_id: str, user_id: uuid.UUID, phone: str) -> bool:
    """Record an inbound opt-out by its WAHA id; False when it was applied before."""
    return s.execute(text(
        "INSERT INTO inbound_opt_outs (waha_message_id, user_id, phone) VALUES (:w, :u, :p)"
        " ON CONFLICT (waha_message_id) DO NOTHING RETURNING 1"),
        {"w": waha_message_id, "u": user_id, "p": phone}).one_or_none() is not None


def count_opt_out(s: Session, user_id: uuid.UUID, phone: str) -> list[uuid.UUID]:
    """opted_out_count + 1 on the user's campaigns that messaged `phone` (a message sent, delivered
    or read); returns their ids."""
    return list(s.execute(text(
        "UPDATE campaigns c SET opted_out_count = c.opted_out_count + 1 WHERE c.id IN ("
        " SELECT ct.campaign_id FROM campaigns c2 JOIN campaign_contacts ct ON ct.campaign_id = c2.id AND ct.phone = :p"
        " JOIN campaign_messages m ON m.campaign_id = ct.campaign_id AND m.contact_id = ct.id"
        f" AND m.state IN ({M.SENT:d}, {M.DELIVERED:d}, {M.READ:d})"
        " WHERE c2.user_id = :u) RETURNING c.id"), {"u": user_id, "p": phone}).scalars())


def chips_for_session(s: Session, session: str) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    """(chip id, user id, chip phone) of every chip on a WAHA session of that name."""
    return [(r.id, r.user_id, r.phone) for r in s.execute(text(
        "SELECT id, user_id, phone FROM chips WHERE waha_session = :s ORDER BY created_at, id"), {"s": session})]
