"""Users and API keys. Credits: repository/credits.py (the ledger), never written here."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from campaign_service.db.models import User


def by_key_hash(session: Session, key_hash: str) -> uuid.UUID | None:
    return session.execute(select(User.id).where(User.api_key_hash == key_hash)).scalar_one_or_none()


def get(session: Session, user_id: uuid.UUID) -> User | None:
    return session.get(User, user_id)


def create(session: Session, *, name: str, key_hash: str, webhook_url: str | None) -> User:
    """A user with no credits (grant them through credits.grant)."""
    user = User(id=uuid.uuid4(), name=name, api_key_hash=key_hash, webhook_url=webhook_url)
    session.add(user)
    session.flush()
    return user


def webhook_url(session: Session, user_id: uuid.UUID) -> str | None:
    return session.execute(select(User.webhook_url).where(User.id == user_id)).scalar_one_or_none()
