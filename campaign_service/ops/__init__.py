"""Domain operations of campaign_service, one transaction each, split by resource. The servicers
only translate protobuf <-> these; the scheduler calls `lifecycle.start_scheduled`.

`base.OpsBase` holds what every operation shares (dependencies, request-id replay, loading the
caller's campaign, recording a change); `inputs` the inputs, results and limits."""

from __future__ import annotations

from dataclasses import dataclass

from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.dispatch import DispatcherClient
from campaign_service.ops.audit import AuditOps
from campaign_service.ops.campaign_lifecycle import CampaignLifecycle
from campaign_service.ops.campaigns import CampaignCrud
from campaign_service.ops.chips import ChipOps
from campaign_service.ops.contacts import ContactOps
from campaign_service.ops.credits import CreditOps
from campaign_service.ops.media import MediaOps
from campaign_service.ops.preview import PreviewOps
from campaign_service.ops.suppressions import SuppressionOps
from campaign_service.ops.watch import WatchOps
from campaign_service.ops.webhooks import WebhookOps


@dataclass(frozen=True)
class Operations:
    """Every operation, by resource, over the same dependencies (what server.py wires up)."""

    campaigns: CampaignCrud
    lifecycle: CampaignLifecycle
    contacts: ContactOps
    media: MediaOps
    chips: ChipOps
    webhooks: WebhookOps
    audit: AuditOps
    watch: WatchOps
    credits: CreditOps
    preview: PreviewOps
    suppressions: SuppressionOps

    @classmethod
    def create(cls, db: Database, settings: Settings, dispatcher: DispatcherClient) -> Operations:
        deps = (db, settings, dispatcher)
        return cls(CampaignCrud(*deps), CampaignLifecycle(*deps), ContactOps(*deps), MediaOps(*deps), ChipOps(*deps),
                   WebhookOps(*deps), AuditOps(*deps), WatchOps(*deps), CreditOps(*deps), PreviewOps(*deps),
                   SuppressionOps(*deps))
