"""whago.campaign.v1.ChipService: protobuf <-> campaign_service.ops. The WAHA API key is write-only."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2

from campaign_service import auth, convert
from campaign_service.ops import Operations
from campaign_service.ops.inputs import ChipInput
from campaign_service.servicers import idem, unwrap
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res


class ChipServicer(chs_grpc.ChipServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def RegisterChip(self, request: chs.RegisterChipRequest, context: grpc.ServicerContext) -> res.Chip:
        c = request.chip
        spec = ChipInput(display_name=c.display_name, phone=c.phone, waha_base_url=c.waha_base_url,
                         waha_session=c.waha_session, waha_api_key=c.waha_api_key, proxy_label=c.proxy_label,
                         pacing=c.pacing)
        out = self.ops.chips.register_chip(auth.current_user_id(), spec,
                                           idem(request.request_id, "RegisterChip", convert.chip))
        return unwrap(out, res.Chip, convert.chip)

    def GetChip(self, request: chs.GetChipRequest, context: grpc.ServicerContext) -> res.Chip:
        return convert.chip(self.ops.chips.get_chip(auth.current_user_id(), request.chip_id))

    def ListChips(self, request: chs.ListChipsRequest, context: grpc.ServicerContext) -> chs.ListChipsResponse:
        page = self.ops.chips.list_chips(auth.current_user_id(), request.page_size, request.page_token)
        return chs.ListChipsResponse(chips=[convert.chip(c) for c in page.items],
                                     next_page_token=page.next_page_token)

    def DeleteChip(self, request: chs.DeleteChipRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.ops.chips.delete_chip(auth.current_user_id(), request.chip_id)
        return empty_pb2.Empty()


def add_to_server(server: Any, ops: Operations) -> None:
    chs_grpc.add_ChipServiceServicer_to_server(ChipServicer(ops), server)
