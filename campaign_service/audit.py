"""Audit log rows, written inside the caller's transaction so they commit (or not) with the change.

The actor says who made the change: by default whoever `auth.current_actor()` names ("user:<id>"
in a user's RPC, "system:dispatcher" in the dispatcher's, "system:<part>" under `auth.acting_as`);
"operator" for the admin CLI."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from campaign_service import auth
from campaign_service.db.models import AuditEvent

SCHEDULER = "system:scheduler"
DELIVERY = "system:delivery"
WATCHDOG = "system:watchdog"
WEBHOOKS = "system:webhooks"
OPERATOR = "operator"


def record(session: Session, *, user_id: uuid.UUID | None, action: str, entity_type: str, entity_id: str,
           description: str, extra_data: dict[str, Any] | None = None, actor: str | None = None) -> None:
    if actor is None:
        actor = auth.current_actor()
    session.add(AuditEvent(user_id=user_id, action=action, entity_type=entity_type, entity_id=entity_id,
                           actor=actor, description=description, extra_data=extra_data or {}))
