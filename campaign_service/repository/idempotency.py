"""AIP-155 request ids: the first response of a (user, request_id), replayed on retries.

`claim` inserts a placeholder first: a concurrent duplicate blocks on the primary key until
the first transaction ends, then sees its stored response (or takes over after a rollback)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Prior:
    method: str
    response: bytes


def claim(session: Session, user_id: uuid.UUID, request_id: str, method: str) -> Prior | None:
    """None when this transaction now owns the key, else the earlier result."""
    inserted = session.execute(text(
        "INSERT INTO idempotency_keys (user_id, request_id, method, response) VALUES (:u, :r, :m, '')"
        " ON CONFLICT (user_id, request_id) DO NOTHING RETURNING 1"),
        {"u": user_id, "r": request_id, "m": method}).first()
    if inserted is not None:
        return None
    row = session.execute(text(
        "SELECT method, response FROM idempotency_keys WHERE user_id = :u AND request_id = :r"),
        {"u": user_id, "r": request_id}).one()
    return Prior(row.method, bytes(row.response))


def store(session: Session, user_id: uuid.UUID, request_id: str, response: bytes) -> None:
    session.execute(text("UPDATE idempotency_keys SET response = :b WHERE user_id = :u AND request_id = :r"),
                    {"b": response, "u": user_id, "r": request_id})


def forget(session: Session, user_id: uuid.UUID, request_id: str) -> None:
    session.execute(text("DELETE FROM idempotency_keys WHERE user_id = :u AND request_id = :r"),
                    {"u": user_id, "r": request_id})
