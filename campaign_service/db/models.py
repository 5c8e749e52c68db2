"""SQLAlchemy models. State columns hold the protobuf enum numbers (CampaignState, MessageState,
ChipState) so translation is a cast, not a lookup table."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from campaign_service.states import CampaignState, MessageState


class Base(DeclarativeBase):
    pass


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class User(Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    # sha256 hex of the API key; keys are random 32-byte tokens, so a fast hash is enough.
    api_key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # Credit balance, denormalised from credit_transactions (repository/credits.py writes both in one
    # transaction): credits = available, credits_reserved = held by messages not yet final, both
    # before what running campaigns settled since (Campaign.credits_*_unfolded; see balance()).
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    credits_reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()


class Chip(Base):
    __tablename__ = "chips"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    display_name: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    phone: Mapped[str] = mapped_column(Text, nullable=False)
    waha_base_url: Mapped[str] = mapped_column(Text, nullable=False)
    waha_session: Mapped[str] = mapped_column(Text, nullable=False)
    waha_api_key: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    proxy_label: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    state: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="1")
    state_reason: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    # whago.campaign.v1.Pacing as proto JSON.
    pacing: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    # whago.campaign.v1.WarmupPlan as proto JSON, defaults filled in; NULL = no warm-up (migration 0011).
    warmup: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    state: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    state_reason: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    # list of whago.campaign.v1.MessageTemplate as proto JSON.
    templates: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    # whago.campaign.v1.CampaignSettings as proto JSON.
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    chip_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), nullable=False,
                                                      server_default=text("'{}'::uuid[]"))
    schedule_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The columns (template variables) its imported contacts carry, kept by ImportContacts (0008).
    variable_names: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False,
                                                      server_default=text("'{}'::text[]"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Counters kept in step with campaign_messages in the same transactions, so Get is one row read.
    total_contacts: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    pending_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    sent_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    delivered_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    read_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    failed_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    skipped_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    opted_out_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")  # suppression
    # Credits its delivery reports consumed / released that the users row does not show yet
    # (repository/credits.py: folded into it when the campaign ends, so reports never lock it; 0015).
    credits_consumed_unfolded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    credits_released_unfolded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Bumped by Start/Resume/Pause/Cancel: lanes of an older epoch lease nothing, and arq job ids
    # (which embed it) are never reused.
    dispatch_epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Optimistic concurrency: the etag is derived from it.
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")

    __table_args__ = (
        Index("ix_campaigns_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        Index("ix_campaigns_user_state_created", "user_id", "state", text("created_at DESC"), text("id DESC")),
        Index("ix_campaigns_scheduled", "schedule_time", postgresql_where=text(f"state = {CampaignState.SCHEDULED:d}")),
        Index("ix_campaigns_running", "id", postgresql_where=text(f"state = {CampaignState.RUNNING:d}")),
    )


class Contact(Base):
    __tablename__ = "campaign_contacts"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # No foreign key (migration 0014): creators hold the campaign row locked; rows of a deleted
    # campaign are purged after it (campaign_purges).
    campaign_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    # E.164 digits without "+".
    phone: Mapped[str] = mapped_column(Text, nullable=False)
    chat_id: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    variables: Mapped[dict[str, str]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    # Import order (send order unless the campaign shuffles).
    row_no: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (UniqueConstraint("campaign_id", "phone", name="uq_contacts_campaign_phone"),)


class Message(Base):
    __tablename__ = "campaign_messages"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # No foreign key, as for contacts (migration 0014): the per-row check was half of a big Start.
    campaign_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    contact_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    chip_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    state: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="1")
    # Send order within the campaign.
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    template_index: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    waha_message_id: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_messages_lane", "campaign_id", "chip_id", "state", "seq"),
        Index("ix_messages_campaign_state", "campaign_id", "state", "id"),
        # SENDING only: how a lease finds the lane's expired leases (migration 0003).
        Index("ix_messages_lease_expiry", "campaign_id", "chip_id", "lease_expires_at",
              postgresql_where=text(f"state = {MessageState.SENDING:d}")),
        # Messages carrying a WAHA id: how a WhatsApp receipt finds its message (migration 0005).
        Index("ix_messages_waha_id", "waha_message_id", postgresql_where=text("waha_message_id IS NOT NULL")),
    )


class CampaignPurge(Base):
    """A deleted campaign whose contacts and messages are still being removed in batches (0014)."""

    __tablename__ = "campaign_purges"
    campaign_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    queued_at: Mapped[datetime] = _now()


class DeliveryLane(Base):
    """One row per (campaign, chip) lane: when it last leased (or was restarted by the watchdog).
    Separate from campaigns so that leasing never writes the campaign row (migration 0002)."""

    __tablename__ = "delivery_lanes"
    campaign_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"),
                                                   primary_key=True)
    chip_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    last_seen_at: Mapped[datetime] = _now()
    lease_seconds: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    lease_owner: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    # A lane holding off on purpose (cap, closed window) said it sends again at resume_at, under
    # dispatch epoch resume_epoch (ReportLaneWait): the watchdog leaves it alone until then (0004).
    resume_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resume_epoch: Mapped[int | None] = mapped_column(BigInteger)


class Media(Base):
    __tablename__ = "campaign_media"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    campaign_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("campaigns.id"), nullable=False, index=True)
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    mime_type: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Path of the stored file, relative to the media directory.
    path: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    created_at: Mapped[datetime] = _now()
    # -- media dedup (migration 0012): content hash; MediaKind sniffed from the bytes (0: legacy row).
    sha256: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default=text("0"), default=0)


class AuditEvent(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), index=True)
    action: Mapped[str] = mapped_column(Text, nullable=False)
    entity_type: Mapped[str] = mapped_column(Text, nullable=False)
    entity_id: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    extra_data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_audit_entity", "entity_type", "entity_id"),
                      Index("ix_audit_user_time", "user_id", "id"))


class EventStream(Base):
    """The last sequence number of one event stream (`campaign:<id>`, `chip:<id>`, `webhook:<id>`)."""

    __tablename__ = "event_streams"
    stream: Mapped[str] = mapped_column(Text, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # When the stream last carried a progress event: progress is rate-bounded (migration 0006).
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """The outbox: one row per state change, written in the change's own transaction."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    stream: Mapped[str] = mapped_column(Text, nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now()
    relayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("stream", "seq", name="uq_events_stream_seq"),
        Index("ix_events_unrelayed", "id", postgresql_where=text("relayed_at IS NULL")),
        Index("ix_events_user", "user_id", "id"),
    )


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    # Event types delivered; empty means every type.
    event_types: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default=text("'{}'::text[]"))
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    disabled_reason: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    # After RotateSecret the old secret signs too, until previous_secret_expires_at.
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # First failure of the current unbroken run of failures (None while deliveries succeed).
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class WebhookDelivery(Base):
    """One event owed to one endpoint. state: whago.campaign.v1.DeliveryState."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
                                                   nullable=False)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), nullable=False)
    stream: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = _now()
    last_status_code: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_deliveries_open", "endpoint_id", "stream", "id", postgresql_where=text("state = 1")),
        Index("ix_deliveries_endpoint", "endpoint_id", "id"),
    )


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
                                             nullable=False, index=True)
    attempted_at: Mapped[datetime] = _now()
    status_code: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    error: Mapped[str] = mapped_column(Text, nullable=False, server_default="")


class CreditTransaction(Base):
    """The credit ledger (migration 0006): one row per operation (a Start's RESERVE, a report batch's
    CONSUME and RELEASE, a Cancel's RELEASE, an operator's GRANT), never one per message. kind holds
    CreditTransactionKind numbers. No FK to campaigns: entries outlive a deleted campaign."""

    __tablename__ = "credit_transactions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), nullable=False)
    campaign_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    kind: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_credit_tx_user", "user_id", text("id DESC")),
        Index("ix_credit_tx_campaign", "campaign_id", text("id DESC"),
              postgresql_where=text("campaign_id IS NOT NULL")),
    )


class NumberCheck(Base):
    """WAHA's check-exists answer for a number, per user (migration 0009)."""

    __tablename__ = "number_checks"
    user_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    phone: Mapped[str] = mapped_column(Text, primary_key=True)
    on_whatsapp: Mapped[bool] = mapped_column(Boolean, nullable=False)
    chat_id: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    checked_at: Mapped[datetime] = _now()


class UserLimits(Base):
    """An operator's per-user quotas and RPC rate; NULL keeps the service-wide default (0013)."""

    __tablename__ = "user_limits"
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    campaigns: Mapped[int | None] = mapped_column(Integer)
    contacts_per_campaign: Mapped[int | None] = mapped_column(Integer)
    chips: Mapped[int | None] = mapped_column(Integer)
    rpc_per_second: Mapped[float | None] = mapped_column(Float)


class IdempotencyKey(Base):
    """AIP-155: the first response of a request_id, replayed on retries."""

    __tablename__ = "idempotency_keys"
    user_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    method: Mapped[str] = mapped_column(Text, nullable=False)
    response: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _now()
