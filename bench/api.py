"""CampaignService/ChipService stubs for one user, plus direct-SQL fixtures that build large
campaigns quickly (COPY) in the exact shape ImportContacts/CreateCampaign produce."""

from __future__ import annotations

import io
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import grpc

from bench.stack import SANDBOX_API_KEY, Stack
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res

FINAL = (res.CAMPAIGN_STATE_COMPLETED, res.CAMPAIGN_STATE_CANCELLED)
LONG = 600.0  # RPC deadline for the bulk operations (seconds)
Metadata = tuple[tuple[str, str | bytes], ...]


def iter_phone_rows(n: int) -> Iterator[tuple[str, str, str]]:
    """n distinct valid Brazilian mobiles: (as typed, E.164 digits, WAHA chat id)."""
    base = secrets.randbelow(10**6) * 100
    for i in range(n):
        sub = f"{(base + i) % 10**8:08d}"
        digits = f"55119{sub}"
        yield f"+55 11 9{sub}", digits, f"{digits}@c.us"


def phone_rows(n: int) -> list[tuple[str, str, str]]:
    return list(iter_phone_rows(n))


# Distinct per process (a user's chips must be distinct numbers): a random start, then consecutive.
_PHONES = itertools.count(secrets.randbelow(10**9))


def _next_phone() -> str:
    return f"5511{next(_PHONES) % 10**9:09d}"


class Api:
    """Stubs bound to one user's key."""

    def __init__(self, channel: grpc.Channel, key: str) -> None:
        self.key = key
        self.md: Metadata = (("authorization", f"Bearer {key}"),)
        self.campaigns = cs_grpc.CampaignServiceStub(channel)
        self.chips = chs_grpc.ChipServiceStub(channel)

    def chip(self, waha_url: str, session: str | None = None, interval: tuple[float, float] = (0.0, 0.0)) -> res.Chip:
        return self.chips.RegisterChip(chs.RegisterChipRequest(chip=res.Chip(
            display_name="bench chip", phone=_next_phone(),
            waha_base_url=waha_url, waha_session=session or f"b-{secrets.token_hex(5)}",
            waha_api_key=SANDBOX_API_KEY,
            pacing=res.Pacing(interval_min_seconds=interval[0], interval_max_seconds=interval[1]))),
            metadata=self.md, timeout=30)

    def campaign(self, chips: Iterable[res.Chip], *, name: str = "bench campaign",
                 interval: tuple[float, float] = (0.0, 0.0), camouflage: bool = False,
                 templates: Sequence[str] = ("Olá {{name}}, oferta da semana!",)) -> res.Campaign:
        s = res.CampaignSettings(  # no number checks: the figures measure sending (the baselines check none)
            pacing=res.Pacing(interval_min_seconds=interval[0], interval_max_seconds=interval[1]),
            camouflage=res.Camouflage(send_seen=camouflage, typing=camouflage), verify_numbers=False)
        return self.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
            name=name, templates=[res.MessageTemplate(text=t) for t in templates], settings=s,
            chip_ids=[c.id for c in chips])), metadata=self.md, timeout=30)

    def import_stream(self, campaign_id: str, phones: Sequence[str], batch: int = 1000) -> cs.ImportContactsResponse:
        def reqs() -> Iterator[cs.ImportContactsRequest]:
            for lo in range(0, len(phones), batch):
                yield cs.ImportContactsRequest(campaign_id=campaign_id, contacts=[
                    cs.ContactInput(phone=p, name=f"Contact {lo + j}") for j, p in enumerate(phones[lo:lo + batch])])
        return self.campaigns.ImportContacts(reqs(), metadata=self.md, timeout=LONG)

    def get(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.GetCampaign(cs.GetCampaignRequest(campaign_id=campaign_id), metadata=self.md, timeout=30)

    def start(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.StartCampaign(cs.StartCampaignRequest(campaign_id=campaign_id), metadata=self.md,
                                            timeout=LONG)

    def cancel(self, campaign_id: str) -> res.Campaign:
        return self.campaigns.CancelCampaign(cs.CancelCampaignRequest(campaign_id=campaign_id), metadata=self.md,
                                             timeout=LONG)

    def delete(self, campaign_id: str) -> cs.DeleteCampaignResponse:
        return self.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=campaign_id), metadata=self.md,
                                             timeout=LONG)

    def wait(self, campaign_id: str, pred: Callable[[res.Campaign], bool], timeout: float,
             poll: float = 0.05) -> res.Campaign:
        """Poll GetCampaign until pred holds (bounded in time)."""
        deadline = time.monotonic() + timeout
        c = self.get(campaign_id)
        while not pred(c):
            if time.monotonic() > deadline:
                raise TimeoutError(f"campaign {campaign_id} stuck: state={res.CampaignState.Name(c.state)} "
                                   f"pending={c.pending_count} sent={c.sent_count} failed={c.failed_count}")
            time.sleep(poll)
            c = self.get(campaign_id)
        return c


def copy_buffer(rows: Iterable[Sequence[object]]) -> io.StringIO:
    """Rows in COPY text format, ready to send."""
    buf = io.StringIO()
    for r in rows:
        buf.write("\t".join("\\N" if v is None else str(v).replace("\\", "\\\\").replace("\t", " ") for v in r))
        buf.write("\n")
    buf.seek(0)
    return buf


def copy_send(cur: object, table: str, columns: Sequence[str], buf: io.StringIO) -> None:
    """COPY a buffer of copy_buffer into table through psycopg2's copy_expert."""
    cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buf)  # type: ignore[attr-defined]


def copy_rows(cur: object, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """COPY rows (text format) into table through psycopg2's copy_expert."""
    copy_send(cur, table, columns, copy_buffer(rows))


CONTACT_COLUMNS = ("campaign_id", "phone", "chat_id", "name", "variables", "row_no")


def contact_tuples(campaign_id: str, n: int) -> Iterator[tuple[object, ...]]:
    """What ImportContacts stores for n typed phones: normalized digits, chat id, name, row number."""
    for i, (_, digits, chat) in enumerate(iter_phone_rows(n)):
        yield (campaign_id, digits, chat, f"Contact {i}", "{}", i + 1)


def seed_contacts(stack: Stack, campaign_id: str, n: int, chunk: int = 100_000) -> None:
    """Put n contacts into a DRAFT campaign directly (COPY), as a finished ImportContacts would
    leave them (rows + total_contacts). Fixture only: the import itself is figure 1."""
    with stack.db() as conn, conn.cursor() as cur:
        rows = contact_tuples(campaign_id, n)
        while True:
            batch = list(itertools.islice(rows, chunk))
            if not batch:
                break
            copy_rows(cur, "campaign_contacts", CONTACT_COLUMNS, batch)
        cur.execute("UPDATE campaigns SET total_contacts = total_contacts + %s WHERE id = %s", (n, campaign_id))
    with stack.db(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE campaign_contacts")


def sql_campaign(stack: Stack, user_id: uuid.UUID, chip_ids: Sequence[str], like: str | None = None,
                 state: int = res.CAMPAIGN_STATE_DRAFT) -> str:
    """A campaign row inserted directly; templates/settings copied from campaign `like` if given."""
    cid = str(uuid.uuid4())
    templates, settings = json.dumps([{"text": "Olá {{name}}"}]), json.dumps({})
    if like:
        rows = stack.sql("SELECT templates::text, settings::text FROM campaigns WHERE id = %s", (like,))
        if rows:
            templates, settings = rows[0][0], rows[0][1]
    stack.sql("INSERT INTO campaigns (id, user_id, name, state, templates, settings, chip_ids) "
              "VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::uuid[]) RETURNING id",
              (cid, str(user_id), "bench baseline", state, templates, settings, list(chip_ids)))
    return cid
