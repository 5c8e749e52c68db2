"""What every domain operation shares: its dependencies and the steps around its transaction
(idempotent replay of a request id, loading the caller's campaign, recording a change: its audit
entry and its outbox event, in the change's transaction)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from campaign_service import audit, errors, outbox
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.db.models import Campaign
from campaign_service.dispatch import DispatcherClient
from campaign_service.lifecycle import State
from campaign_service.ops.inputs import MAX_REQUEST_ID, Idem, Replayed
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.repository import idempotency

log = logging.getLogger("campaign_service.campaigns")


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_request_id(idem: Idem | None) -> None:
    if idem is not None and len(idem.request_id) > MAX_REQUEST_ID:
        raise errors.InvalidArgument([("request_id", f"at most {MAX_REQUEST_ID} characters")])


class OpsBase:
    """The dependencies and shared steps of the operations of one resource. Thread-safe: one
    transaction per call. A mutation runs, inside its transaction:
    `if (r := self._replay(s, user_id, idem)) is not None: return r` ... `self._remember(s, user_id,
    idem, result)`, with `_campaign_changed` (or audit + outbox) for what it changed."""

    def __init__(self, db: Database, settings: Settings, dispatcher: DispatcherClient) -> None:
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher

    def _replay(self, s: Session, user_id: uuid.UUID, idem: Idem | None) -> Replayed | None:
        if idem is None or not idem.request_id:
            return None
        check_request_id(idem)
        prior = idempotency.claim(s, user_id, idem.request_id, idem.method)
        if prior is None:
            return None
        if prior.method != idem.method:
            raise errors.InvalidArgument([("request_id", f"already used for {prior.method}")])
        log.info("request_id=%s replayed for %s", idem.request_id, idem.method)
        return Replayed(prior.response)

    @staticmethod
    def _remember(s: Session, user_id: uuid.UUID, idem: Idem | None, result: Any) -> None:
        if idem is not None and idem.request_id:
            idempotency.store(s, user_id, idem.request_id, idem.encode(result))

    @staticmethod
    def _campaign(s: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, lock: bool = False) -> Campaign:
        c = campaigns_repo.get(s, user_id, campaign_id, for_update=lock)
        if c is None:
            raise errors.NotFound("campaign", str(campaign_id))
        return c

    @staticmethod
    def _campaign_changed(s: Session, c: Campaign, *, action: str, event: str, description: str,
                          extra: dict[str, Any] | None = None) -> None:
        """A campaign changed: one audit entry and one event (state and reason as they are now)."""
        audit.record(s, user_id=c.user_id, action=action, entity_type="campaign", entity_id=str(c.id),
                     description=description, extra_data=extra)
        outbox.campaign_event(s, user_id=c.user_id, campaign_id=c.id, type=event, state=State(c.state).name,
                              reason=c.state_reason, extra=extra)
