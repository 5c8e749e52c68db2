"""The protobuf state enums as typed IntEnums, for comparisons and for SQL on the integer columns.

Every value is taken from the generated code (never retyped), and tests/test_states.py checks that
each class has exactly the members of its proto enum. SQL embeds them with `{MessageState.PENDING:d}`
so a query reads by name and still compiles to the same literal."""

from __future__ import annotations

from enum import IntEnum

from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wpb


class CampaignState(IntEnum):
    UNSPECIFIED = res.CAMPAIGN_STATE_UNSPECIFIED
    DRAFT = res.CAMPAIGN_STATE_DRAFT
    SCHEDULED = res.CAMPAIGN_STATE_SCHEDULED
    RUNNING = res.CAMPAIGN_STATE_RUNNING
    PAUSED = res.CAMPAIGN_STATE_PAUSED
    CANCELLED = res.CAMPAIGN_STATE_CANCELLED
    COMPLETED = res.CAMPAIGN_STATE_COMPLETED

    @property
    def proto_name(self) -> str:
        return res.CampaignState.Name(self.value)


class MessageState(IntEnum):
    UNSPECIFIED = res.MESSAGE_STATE_UNSPECIFIED
    PENDING = res.MESSAGE_STATE_PENDING
    SENDING = res.MESSAGE_STATE_SENDING
    SENT = res.MESSAGE_STATE_SENT
    DELIVERED = res.MESSAGE_STATE_DELIVERED
    READ = res.MESSAGE_STATE_READ
    FAILED = res.MESSAGE_STATE_FAILED
    SKIPPED = res.MESSAGE_STATE_SKIPPED


class ChipState(IntEnum):
    UNSPECIFIED = res.CHIP_STATE_UNSPECIFIED
    ACTIVE = res.CHIP_STATE_ACTIVE
    UNAVAILABLE = res.CHIP_STATE_UNAVAILABLE
    RESTRICTED = res.CHIP_STATE_RESTRICTED


class Outcome(IntEnum):
    """DeliveryOutcome: what a lane reports about one message."""

    UNSPECIFIED = dpb.DELIVERY_OUTCOME_UNSPECIFIED
    ATTEMPTING = dpb.DELIVERY_OUTCOME_ATTEMPTING
    SENT = dpb.DELIVERY_OUTCOME_SENT
    FAILED = dpb.DELIVERY_OUTCOME_FAILED
    RELEASED = dpb.DELIVERY_OUTCOME_RELEASED
    UNKNOWN = dpb.DELIVERY_OUTCOME_UNKNOWN
    SKIPPED = dpb.DELIVERY_OUTCOME_SKIPPED
    DELIVERED = dpb.DELIVERY_OUTCOME_DELIVERED
    READ = dpb.DELIVERY_OUTCOME_READ


class DeliveryState(IntEnum):
    UNSPECIFIED = wpb.DELIVERY_STATE_UNSPECIFIED
    PENDING = wpb.DELIVERY_STATE_PENDING
    DELIVERED = wpb.DELIVERY_STATE_DELIVERED
    FAILED = wpb.DELIVERY_STATE_FAILED


class CreditKind(IntEnum):
    """CreditTransactionKind: what a credit ledger entry does (credit_transactions.kind)."""

    UNSPECIFIED = crs.CREDIT_TRANSACTION_KIND_UNSPECIFIED
    GRANT = crs.CREDIT_TRANSACTION_KIND_GRANT
    RESERVE = crs.CREDIT_TRANSACTION_KIND_RESERVE
    CONSUME = crs.CREDIT_TRANSACTION_KIND_CONSUME
    RELEASE = crs.CREDIT_TRANSACTION_KIND_RELEASE
