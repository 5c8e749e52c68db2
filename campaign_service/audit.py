"""Audit log rows, written inside the caller's transaction so they commit (or not) with the change."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from campaign_service.db.models import AuditEvent


def record(session: Session, *, user_id: uuid.UUID | None, action: str, entity_type: str, entity_id: str,
           description: str, extra_data: dict[str, Any] | None = None) -> None:
    session.add(AuditEvent(user_id=user_id, action=action, entity_type=entity_type, entity_id=entity_id,
                           description=description, extra_data=extra_data or {}))
