"""campaign_service.states mirrors the generated protobuf enums exactly (names and values)."""

from __future__ import annotations

from enum import IntEnum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from campaign_service import states
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import delivery_service_pb2 as dpb
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2 as wpb


@pytest.mark.parametrize(("ours", "proto", "prefix"), [
    (states.CampaignState, res.CampaignState, "CAMPAIGN_STATE_"),
    (states.MessageState, res.MessageState, "MESSAGE_STATE_"),
    (states.ChipState, res.ChipState, "CHIP_STATE_"),
    (states.Outcome, dpb.DeliveryOutcome, "DELIVERY_OUTCOME_"),
    (states.DeliveryState, wpb.DeliveryState, "DELIVERY_STATE_"),
    (states.CreditKind, crs.CreditTransactionKind, "CREDIT_TRANSACTION_KIND_"),
])
def test_mirrors_the_proto_enum(ours: type[IntEnum], proto: EnumTypeWrapper, prefix: str) -> None:
    assert {prefix + m.name: m.value for m in ours} == dict(proto.items())


def test_proto_name() -> None:
    assert states.CampaignState.RUNNING.proto_name == "CAMPAIGN_STATE_RUNNING"
