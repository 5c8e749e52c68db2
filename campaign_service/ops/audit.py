"""The audit trail (AuditService): a user's entries, newest first, filtered."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select

from campaign_service import errors, pagination
from campaign_service.db.models import AuditEvent
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import Page

ENTITY_TYPES = ("campaign", "chip", "webhook")
MAX_FILTER = 200


class AuditOps(OpsBase):
    def list_entries(self, user_id: uuid.UUID, *, entity_type: str, entity_id: str, action: str,
             start: datetime | None, end: datetime | None, page_size: int, page_token: str) -> Page:
        v: list[tuple[str, str]] = []
        if entity_type and entity_type not in ENTITY_TYPES:
            v.append(("entity_type", "must be one of " + ", ".join(ENTITY_TYPES)))
        if entity_id and not entity_type:
            v.append(("entity_id", "needs entity_type"))
        if len(entity_id) > MAX_FILTER:
            v.append(("entity_id", f"at most {MAX_FILTER} characters"))
        if len(action) > MAX_FILTER:
            v.append(("action", f"at most {MAX_FILTER} characters"))
        if start is not None and end is not None and end <= start:
            v.append(("end_time", "must be after start_time"))
        if v:
            raise errors.InvalidArgument(v)
        n = pagination.page_size(page_size)
        filter_ = "|".join([entity_type, entity_id, action, start.isoformat() if start else "",
                            end.isoformat() if end else ""])
        cursor = pagination.decode(page_token, "audit", filter_)
        q = select(AuditEvent).where(AuditEvent.user_id == user_id)
        if entity_type:
            q = q.where(AuditEvent.entity_type == entity_type)
        if entity_id:
            q = q.where(AuditEvent.entity_id == entity_id)
        if action:
            q = q.where(AuditEvent.action == action)
        if start is not None:
            q = q.where(AuditEvent.created_at >= start)
        if end is not None:
            q = q.where(AuditEvent.created_at < end)
        if cursor:
            if not isinstance(cursor[0], int) or isinstance(cursor[0], bool):
                raise errors.InvalidArgument([("page_token", "malformed page token")])
            q = q.where(AuditEvent.id < cursor[0])
        q = q.order_by(AuditEvent.id.desc()).limit(n + 1)
        with self.db.session() as s:
            rows = list(s.execute(q).scalars())
        token = ""
        if len(rows) > n:
            rows = rows[:n]
            token = pagination.encode("audit", filter_, [rows[-1].id])
        return Page(rows, token)
