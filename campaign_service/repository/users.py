"""Users, API keys and credits."""

from __future__ import annotations

import uuid

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from campaign_service.db.models import User


def by_key_hash(session: Session, key_hash: str) -> uuid.UUID | None:
    return session.execute(select(User.id).where(User.api_key_hash == key_hash)).scalar_one_or_none()


def get(session: Session, user_id: uuid.UUID) -> User | None:
    return session.get(User, user_id)


def create(session: Session, *, name: str, key_hash: str, credits: int, webhook_url: str | None) -> User:
    user = User(id=uuid.uuid4(), name=name, api_key_hash=key_hash, credits=credits, webhook_url=webhook_url)
    session.add(user)
    session.flush()
    return user


def webhook_url(session: Session, user_id: uuid.UUID) -> str | None:
    return session.execute(select(User.webhook_url).where(User.id == user_id)).scalar_one_or_none()


def debit(session: Session, user_id: uuid.UUID, amount: int) -> int | None:
    """Take `amount` credits atomically; None (nothing taken) when the balance is short."""
    return session.execute(text(
        "UPDATE users SET credits = credits - :n WHERE id = :u AND credits >= :n RETURNING credits"),
        {"n": amount, "u": user_id}).scalar_one_or_none()


def credit(session: Session, user_id: uuid.UUID, amount: int) -> int | None:
    return session.execute(update(User).where(User.id == user_id).values(credits=User.credits + amount)
                           .returning(User.credits)).scalar_one_or_none()


def balance(session: Session, user_id: uuid.UUID) -> int:
    return int(session.execute(select(User.credits).where(User.id == user_id)).scalar_one_or_none() or 0)
