"""Small helpers for tests that drive the real services over gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import secrets
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import grpc
import sqlalchemy as sa
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from devstack.procs import ServiceProcess
from devstack.servers import Redis as RedisServer
from whago.campaign.v1 import audit_service_pb2_grpc as aud_grpc
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res
from whago.campaign.v1 import webhook_service_pb2_grpc as wh_grpc
from whago.dispatcher.v1 import dispatcher_service_pb2 as dispatcher_pb
from whago.dispatcher.v1 import dispatcher_service_pb2_grpc as dispatcher_grpc

FINAL = (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED)


# Distinct per process (a user's chips must be distinct numbers): a random start, then consecutive.
_PHONES = itertools.count(secrets.randbelow(10**9))


def _next_phone() -> str:
    return f"5511{next(_PHONES) % 10**9:09d}"


class Api:
    """The public services' stubs bound to one user's key."""

    def __init__(self, channel: grpc.Channel, key: str) -> None:
        self.md = [("authorization", f"Bearer {key}")]
        self.campaigns = cs_grpc.CampaignServiceStub(channel)
        self.chips = chs_grpc.ChipServiceStub(channel)
        self.webhooks = wh_grpc.WebhookServiceStub(channel)
        self.audit = aud_grpc.AuditServiceStub(channel)

    def chip(self, waha_url: str, api_key: str, session: str | None = None,
             interval: tuple[float, float] = (0.0, 0.0), **pacing: int) -> res.Chip:
        return self.chips.RegisterChip(chs.RegisterChipRequest(chip=res.Chip(
            display_name="test chip", phone=_next_phone(),
            waha_base_url=waha_url, waha_session=session or f"s-{secrets.token_hex(4)}", waha_api_key=api_key,
            pacing=res.Pacing(interval_min_seconds=interval[0], interval_max_seconds=interval[1], **pacing))),
            metadata=self.md)

    def campaign(self, chips: Iterable[res.Chip], *, name: str = "test campaign",
                 interval: tuple[float, float] = (0.0, 0.0), camouflage: bool = False,
                 templates: Iterable[str] = ("Olá {{name}}",), **settings: object) -> res.Campaign:
        """A campaign; number verification off unless asked (verify_numbers=True), so tests of other
        paths (bursts, fences) keep their shape (tests/test_verification.py covers it)."""
        settings.setdefault("verify_numbers", False)
        s = res.CampaignSettings(
            pacing=res.Pacing(interval_min_seconds=interval[0], interval_max_seconds=interval[1]),
            camouflage=res.Camouflage(send_seen=camouflage, typing=camouflage), **settings)  # type: ignore[arg-type]
        return self.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
            name=name, templates=[res.MessageTemplate(text=t) for t in templates], settings=s,
            chip_ids=[c.id for c in chips])), metadata=self.md)

    def import_phones(self, campaign_id: str, phones: Iterable[str], batch: int = 1000) -> cs.ImportContactsResponse:
        def reqs() -> Iterator[cs.ImportContactsRequest]:
            buf: list[cs.ContactInput] = []
            for i, p in enumerate(phones):
                buf.append(cs.ContactInput(phone=p, name=f"Contact {i}"))
                if len(buf) >= batch:
                    yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=buf)
                    buf = []
            yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=buf)
        return self.campaigns.ImportContacts(reqs(), metadata=self.md)

    def start_sending(self, campaign_id: str, n: int, sent_at_least: int = 0, timeout: float = 60.0) -> list[str]:
        """Import n fresh numbers and Start; with `sent_at_least`, wait until that many were sent."""
        numbers = phones(n)
        self.import_phones(campaign_id, numbers)
        self.start(campaign_id)
        if sent_at_least:
            self.wait(campaign_id, lambda c: c.sent_count >= sent_at_least, timeout)
        return numbers

    def get(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=campaign_id), metadata=self.md)

    def start(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.StartCampaign(cs.StartCampaignRequest(campaign_id=campaign_id), metadata=self.md)

    def pause(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.PauseCampaign(cs.PauseCampaignRequest(campaign_id=campaign_id), metadata=self.md)

    def resume(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.ResumeCampaign(cs.ResumeCampaignRequest(campaign_id=campaign_id), metadata=self.md)

    def cancel(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.CancelCampaign(cs.CancelCampaignRequest(campaign_id=campaign_id), metadata=self.md)

    def wait(self, campaign_id: str, pred: object, timeout: float = 60.0) -> res.Campaign:
        """Poll GetCampaign until pred(campaign) is true (bounded in time)."""
        deadline = time.monotonic() + timeout
        c = self.get(campaign_id)
        while not pred(c):  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"campaign {campaign_id} did not reach the expected state: {c}")
            time.sleep(0.1)
            c = self.get(campaign_id)
        return c

    def wait_final(self, campaign_id: str, timeout: float = 60.0) -> res.Campaign:
        return self.wait(campaign_id, lambda c: c.state in FINAL, timeout)


def phones(n: int, start: int = 0) -> list[str]:
    """n distinct valid Brazilian mobile numbers, as users type them."""
    base = secrets.randbelow(10**6) * 100
    return [f"+55 11 9{(base + start + i) % 10**8:08d}" for i in range(n)]


def key_hash(api_key: str) -> str:
    """How users.api_key_hash stores a key (sha256, hex)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def user_id(engine: sa.Engine, api_key: str) -> uuid.UUID:
    """The users.id behind an API key."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM users WHERE api_key_hash = :h"),
                            {"h": key_hash(api_key)}).scalar_one()  # type: ignore[no-any-return]


# A user's balance as the ledger defines it, written out independently of repository/credits.py:
# the users row plus what its running (RUNNING 3 / PAUSED 4) campaigns settled and have not folded
# into it yet; :u is the user. `UNFOLDED_ELSEWHERE_SQL`: a campaign in any other state still holding
# settled credits (a missed fold) — must count 0.
BALANCE_SQL = """
SELECT u.credits + r.released AS available, u.credits_reserved - r.consumed - r.released AS reserved
FROM users u, (SELECT COALESCE(sum(credits_consumed_unfolded), 0) AS consumed,
                      COALESCE(sum(credits_released_unfolded), 0) AS released
               FROM campaigns WHERE user_id = :u AND state IN (3, 4)) r
WHERE u.id = :u"""
UNFOLDED_ELSEWHERE_SQL = ("SELECT count(*) FROM campaigns WHERE user_id = :u AND state NOT IN (3, 4)"
                          " AND (credits_consumed_unfolded <> 0 OR credits_released_unfolded <> 0)")


def wait_for(pred: Callable[[], object], timeout: float, what: str | Callable[[], str],
             interval: float = 0.1) -> None:
    """Poll pred() until it is truthy; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def chat_id(phone: str) -> str:
    """The WhatsApp chat id campaign_service derives from a number made by `phones`."""
    return "".join(ch for ch in phone if ch.isdigit()) + "@c.us"


class Ops(Api):
    """Api plus the reads the dispatcher guarantee tests need: every message of a campaign, a chip,
    campaigns with full settings, and GetDispatch with the service token."""

    def messages(self, campaign_id: str) -> list[res.CampaignMessage]:
        out: list[res.CampaignMessage] = []
        token = ""
        for _ in range(10_000):
            page = self.campaigns.ListCampaignMessages(cs.ListCampaignMessagesRequest(
                campaign_id=campaign_id, page_size=1000, page_token=token), metadata=tuple(self.md))
            out.extend(page.messages)
            token = page.next_page_token
            if not token:
                break
        return out

    def get_chip(self, chip_id: str) -> res.Chip:
        return self.chips.GetChip(chs.GetChipRequest(chip_id=chip_id), metadata=tuple(self.md))

    def campaign_with(self, chips: Iterable[res.Chip], settings: res.CampaignSettings,
                      templates: Iterable[str] = ("Olá {{name}}",)) -> res.Campaign:
        if not settings.HasField("verify_numbers"):
            settings.verify_numbers = False
        return self.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
            name="test campaign", templates=[res.MessageTemplate(text=t) for t in templates], settings=settings,
            chip_ids=[c.id for c in chips])), metadata=tuple(self.md))


def get_dispatch(channel: grpc.Channel, token: str, campaign_id: str) -> dispatcher_pb.Dispatch:
    """DispatcherService.GetDispatch with the internal service token."""
    stub = dispatcher_grpc.DispatcherServiceStub(channel)
    return stub.GetDispatch(dispatcher_pb.GetDispatchRequest(campaign_id=campaign_id),
                            metadata=(("authorization", f"Bearer {token}"),), timeout=10)


D = TypeVar("D", bound=Message)
T = TypeVar("T")


def error_details(err: grpc.RpcError, cls: type[D]) -> list[D]:
    """The google.rpc detail messages of type `cls` a failed call carried (BadRequest, ErrorInfo...)."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out: list[D] = []
    for d in status.details if status is not None else ():
        m = cls()
        if d.Unpack(m):
            out.append(m)
    return out


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of the call's BadRequest."""
    return [(v.field, v.description) for br in error_details(err, error_details_pb2.BadRequest)
            for v in br.field_violations]


# -- Prometheus endpoints ----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of a /metrics endpoint, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a labelled counter has no sample before its first event)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


CAMPAIGN_SVC = "whago.campaign.v1.CampaignService"
DELIVERY_SVC = "whago.campaign.v1.DeliveryService"
DISPATCHER_SVC = "whago.dispatcher.v1.DispatcherService"


def rpcs(samples: Samples, service: str, method: str, code: str = "OK") -> float:
    """How many `service`/`method` RPCs a server answered with `code` (grpc_server_handled_total)."""
    return value(samples, "grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code)


def logged_port(p: ServiceProcess) -> int:
    """The port a process logged for its metrics endpoint (started with port 0)."""
    p.wait_logged("metrics on http://", timeout=30)
    m = re.findall(r"metrics on http://[^\s:]+:(\d+)/metrics", p.log_path.read_text(errors="replace"))
    assert m, p.tail()
    return int(m[-1])


def run_with_redis(redis_server: RedisServer, fn: Callable[[Redis], Awaitable[T]]) -> T:
    """Run `fn` with an asyncio client of the test Redis (decoded strings), closed after."""
    async def main() -> T:
        r = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            return await fn(r)
        finally:
            await r.aclose()
    return asyncio.run(main())
