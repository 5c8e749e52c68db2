"""whago.campaign.v1.ChipService: protobuf <-> campaign_service.ops. The WAHA API key is write-only."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2

from campaign_service import auth, convert, warmup
from campaign_service.db.models import Chip
from campaign_service.ops import Operations
from campaign_service.ops.inputs import ChipInput, Replayed, chip_mask_paths
from campaign_service.servicers import idem, unwrap
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res


def _registered(c: Chip) -> res.Chip:
    """A new chip has not sent yet: day 1 of its plan (no Redis read needed)."""
    m = convert.chip(c)
    t = warmup.today(m.warmup if m.HasField("warmup") else None, m.pacing, None, 0.0, 1.0)
    m.effective_daily_cap, m.warmup_day = t.effective_daily_cap, t.warmup_day
    return m


class ChipServicer(chs_grpc.ChipServiceServicer):
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def RegisterChip(self, request: chs.RegisterChipRequest, context: grpc.ServicerContext) -> res.Chip:
        c = request.chip
        spec = ChipInput(display_name=c.display_name, phone=c.phone, waha_base_url=c.waha_base_url,
                         waha_session=c.waha_session, waha_api_key=c.waha_api_key, proxy_label=c.proxy_label,
                         pacing=c.pacing, warmup=c.warmup if c.HasField("warmup") else None)
        out = self.ops.chips.register_chip(auth.current_user_id(), spec,
                                           idem(request.request_id, "RegisterChip", _registered))
        return unwrap(out, res.Chip, _registered)

    def GetChip(self, request: chs.GetChipRequest, context: grpc.ServicerContext) -> res.Chip:
        return self._with_today([self.ops.chips.get_chip(auth.current_user_id(), request.chip_id)])[0]

    def ListChips(self, request: chs.ListChipsRequest, context: grpc.ServicerContext) -> chs.ListChipsResponse:
        page = self.ops.chips.list_chips(auth.current_user_id(), request.page_size, request.page_token)
        return chs.ListChipsResponse(chips=self._with_today(page.items), next_page_token=page.next_page_token)

    def _with_today(self, chips: list[Chip]) -> list[res.Chip]:
        """The API views with today's warm-up day and effective daily cap."""
        views = self.ops.chips.warmup_today(chips)
        out = []
        for c in chips:
            m, t = convert.chip(c), views[str(c.id)]
            m.effective_daily_cap, m.warmup_day = t.effective_daily_cap, t.warmup_day
            out.append(m)
        return out

    def UpdateChip(self, request: chs.UpdateChipRequest, context: grpc.ServicerContext) -> res.Chip:
        c = request.chip
        paths = chip_mask_paths(request.update_mask if request.HasField("update_mask") else None, c)
        spec = ChipInput(display_name=c.display_name, waha_base_url=c.waha_base_url, waha_session=c.waha_session,
                         waha_api_key=c.waha_api_key, proxy_label=c.proxy_label, pacing=c.pacing,
                         warmup=c.warmup if c.HasField("warmup") else None)
        out = self.ops.chips.update_chip(auth.current_user_id(), c.id, spec, paths,
                                         idem(request.request_id, "UpdateChip", convert.chip))
        if isinstance(out, Replayed):
            return unwrap(out, res.Chip, convert.chip)
        return self._with_today([out])[0]

    def DeleteChip(self, request: chs.DeleteChipRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.ops.chips.delete_chip(auth.current_user_id(), request.chip_id)
        return empty_pb2.Empty()


def add_to_server(server: Any, ops: Operations) -> None:
    chs_grpc.add_ChipServiceServicer_to_server(ChipServicer(ops), server)
