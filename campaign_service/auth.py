"""API keys and the caller's identity.

User keys are random tokens stored as sha256 hex; the service token (WHAGO_SERVICE_TOKEN) is for
internal RPCs (DeliveryService) only, and user keys there are PERMISSION_DENIED."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from campaign_service import errors


class NeedsLookup(Exception):
    """Raised instead of querying PostgreSQL when the caller must not block (the event loop): the
    answer is not cached; ask again from a thread."""


KEY_PREFIX = "whk_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, or the internal service (user_id None)."""

    user_id: uuid.UUID | None
    is_service: bool = False
    #: For audit entries: "user:<id>" for a user; the service part otherwise.
    actor: str = ""


_current: ContextVar[Principal | None] = ContextVar("whago_principal", default=None)


def set_current(p: Principal | None) -> object:
    return _current.set(p)


def reset_current(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current_actor() -> str:
    """Who the audit log names for a change made now: the calling user, the dispatcher (internal
    RPCs), or the part of the service acting on its own (see `acting_as`)."""
    p = _current.get()
    if p is None:
        return "system"
    if p.actor:
        return p.actor
    return f"user:{p.user_id}" if p.user_id is not None else "system:dispatcher"


@contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Run a block as a part of the service (scheduler, watchdog...), for the audit log."""
    token = _current.set(Principal(user_id=None, is_service=True, actor=actor))
    try:
        yield
    finally:
        _current.reset(token)


def current_user_id() -> uuid.UUID:
    """The calling user's id; servicers of user-facing services call this."""
    p = _current.get()
    if p is None or p.user_id is None:
        raise errors.Unauthenticated()
    return p.user_id


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization":
            value = v.decode() if isinstance(v, bytes) else v
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def is_service_token(token: str, service_token: str) -> bool:
    """Constant-time for a token of the service token's length (compare_digest reveals no more:
    it returns at once on a length mismatch too); other tokens skip the encoding."""
    return len(token) == len(service_token) and hmac.compare_digest(token.encode(), service_token.encode())
