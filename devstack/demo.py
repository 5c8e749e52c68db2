"""The demo campaign `make run` drives through the public API once the stack is up: a user, three
chips on the WAHA sandbox, a campaign of DEMO_CONTACTS contacts, Start, and its progress."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc

from devstack.procs import REPO, service_env
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res

DEMO_CONTACTS = int(os.environ.get("WHAGO_DEMO_CONTACTS", "50"))
# Demo pace: fast enough to watch finish. Real chips keep WAHA's 30-60 s default.
DEMO_PACING = res.Pacing(interval_min_seconds=0.2, interval_max_seconds=0.6)
Metadata = tuple[tuple[str, str | bytes], ...]


def create_user(env: dict[str, str]) -> str:
    """A demo user with credits (admin CLI); returns its API key."""
    out = subprocess.run([sys.executable, "-m", "campaign_service.admin", "create-user", "--name", "demo",
                          "--credits", "100000"], env=service_env(env), cwd=REPO, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def register_chips(chips: chs_grpc.ChipServiceStub, md: Metadata, sandbox_url: str, sandbox_key: str) -> list[str]:
    ids = []
    for i in range(1, 4):
        chip = chips.RegisterChip(chs.RegisterChipRequest(chip=res.Chip(
            display_name=f"demo chip {i}", phone=f"55119000000{i:02d}", waha_base_url=sandbox_url,
            waha_session=f"chip-{i}", waha_api_key=sandbox_key, pacing=DEMO_PACING)), metadata=md)
        ids.append(chip.id)
    return ids


def create_campaign(campaigns: cs_grpc.CampaignServiceStub, md: Metadata, chip_ids: list[str]) -> res.Campaign:
    settings = res.CampaignSettings(
        pacing=DEMO_PACING,
        camouflage=res.Camouflage(send_seen=True, typing=True, typing_chars_per_second=200, typing_max_seconds=0.3))
    return campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name="demo campaign", description="made by make run",
        templates=[res.MessageTemplate(text="Olá {{name}}, esta é uma demonstração do WHAGO."),
                   res.MessageTemplate(text="Oi {{name}}! Mensagem de teste do WHAGO.")],
        settings=settings, chip_ids=chip_ids)), metadata=md)


def import_contacts(campaigns: cs_grpc.CampaignServiceStub, md: Metadata, campaign_id: str) -> int:
    def rows() -> Iterator[cs.ImportContactsRequest]:
        yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=[
            cs.ContactInput(phone=f"+55 11 9{8000_0000 + i:08d}", name=f"Contato {i}")
            for i in range(DEMO_CONTACTS)])

    return campaigns.ImportContacts(rows(), metadata=md).imported_count


def show_progress(campaigns: cs_grpc.CampaignServiceStub, md: Metadata, campaign_id: str,
                  say: Callable[[str], None], limit_seconds: float = 600) -> None:
    """One line a second until the campaign is final (and its receipts in, or 5 s more)."""
    deadline = time.monotonic() + limit_seconds
    receipts_until = None
    state_name = res.CampaignState.Name
    while time.monotonic() < deadline:
        c = campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=campaign_id), metadata=md)
        say(f"  {state_name(c.state):26} {c.pending_count:4} / {c.sent_count:4} / {c.delivered_count:4} / "
            f"{c.read_count:4} / {c.failed_count:4}")
        if c.state in (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED, res.CAMPAIGN_STATE_PAUSED):
            receipts_until = receipts_until or time.monotonic() + 5
            if c.delivered_count >= c.sent_count or time.monotonic() > receipts_until:
                break
        time.sleep(1)


def run(env: dict[str, str], sandbox_url: str, sandbox_key: str, say: Callable[[str], None]) -> str:
    """The whole demo; returns the demo user's API key."""
    key = create_user(env)
    md: Metadata = (("authorization", f"Bearer {key}"),)
    channel = grpc.insecure_channel(env["CAMPAIGN_LISTEN"])
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        campaigns = cs_grpc.CampaignServiceStub(channel)
        chip_ids = register_chips(chs_grpc.ChipServiceStub(channel), md, sandbox_url, sandbox_key)
        say(f"registered 3 chips on the WAHA sandbox: {', '.join(chip_ids)}")
        camp = create_campaign(campaigns, md, chip_ids)
        say(f"campaign {camp.id}: imported {import_contacts(campaigns, md, camp.id)} contacts")
        campaigns.StartCampaign(cs.StartCampaignRequest(campaign_id=camp.id), metadata=md)
        say("started; progress (pending / sent / delivered / read / failed):")
        show_progress(campaigns, md, camp.id, say)
    finally:
        channel.close()
    return key
