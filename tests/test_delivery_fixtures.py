"""Fixtures and row builders for the DeliveryService tests (no tests here).

The domain tests talk to the real PostgreSQL of the session (`postgres` fixture) through
`campaign_service.db.engine.Database`, inserting users, chips, campaigns, contacts and messages
the way Start leaves them (RUNNING, one message per contact, chips round-robin, one credit reserved
per message through the ledger)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import insert, text

from campaign_service.db.engine import Database
from campaign_service.db.migrate import upgrade
from campaign_service.db.models import Campaign, Chip, Contact, Message, User
from campaign_service.repository import credits
from devstack.servers import Postgres

RUNNING, PAUSED = 3, 4


def migrated_database(postgres: Postgres, name: str) -> Iterator[Database]:
    """Database `name` of the session's PostgreSQL, migrated to head, for a fixture to yield from."""
    postgres.create_database(name)
    url = postgres.url(name)
    upgrade(url)
    db = Database(url, pool_size=20)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def delivery_db(postgres: Postgres) -> Iterator[Database]:
    """The session's PostgreSQL, migrated to head (same database as `database_url`)."""
    yield from migrated_database(postgres, "whago")


class RecordingEvents:
    """The campaign state-change events the outbox received since the fixture began (progress
    events left out): what the relay would publish."""

    def __init__(self, db: Database) -> None:
        self.db = db
        with db.session() as s:
            self.since = int(s.execute(text("SELECT coalesce(max(id), 0) FROM events")).scalar_one())

    @property
    def calls(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.execute(text("SELECT data FROM events WHERE id > :since AND stream LIKE 'campaign:%' "
                                  "AND type <> 'campaign.progress' ORDER BY id"), {"since": self.since}).all()
        return [dict(r.data) for r in rows]

    def states(self, campaign_id: str) -> list[str]:
        return [c["state"] for c in self.calls if c["campaign_id"] == campaign_id]


@pytest.fixture()
def events(delivery_db: Database) -> RecordingEvents:
    return RecordingEvents(delivery_db)


@dataclass
class World:
    """One user's campaign as Start leaves it."""

    user_id: uuid.UUID
    campaign_id: uuid.UUID
    chip_ids: list[uuid.UUID]
    message_ids: list[int] = field(default_factory=list)  # in seq order
    contact_phones: list[str] = field(default_factory=list)

    @property
    def cid(self) -> str:
        return str(self.campaign_id)

    def chip(self, i: int) -> str:
        return str(self.chip_ids[i])


def make_user(db: Database, webhook_url: str | None = None) -> uuid.UUID:
    uid = uuid.uuid4()
    with db.transaction() as s:
        s.add(User(id=uid, name=f"u-{secrets.token_hex(3)}", api_key_hash=secrets.token_hex(32),
                   webhook_url=webhook_url))
        s.flush()
        credits.grant(s, uid, 10**6, "test credits")
    return uid


def make_chips(db: Database, user_id: uuid.UUID, n: int, state: int = 1) -> list[uuid.UUID]:
    ids = sorted(uuid.uuid4() for _ in range(n))
    with db.transaction() as s:
        for cid in ids:
            s.add(Chip(id=cid, user_id=user_id, phone="55119" + str(secrets.randbelow(10**8)).zfill(8),
                       waha_base_url="http://127.0.0.1:1", waha_session=f"s-{secrets.token_hex(3)}", state=state))
    return ids


def make_world(db: Database, *, contacts: int = 10, chips: int = 3, state: int = RUNNING, epoch: int = 1,
               templates: Sequence[dict[str, Any]] = ({"text": "Hi {{name}} ({{phone}}) {{city}}"},),
               settings: dict[str, Any] | None = None, name_chip_ids: bool = True,
               variables: dict[str, str] | None = None) -> World:
    """A campaign in `state` with `contacts` PENDING messages spread round-robin over `chips`."""
    uid = make_user(db)
    chip_ids = make_chips(db, uid, chips)
    camp = uuid.uuid4()
    # Distinct numbers: independent draws collided about once in 2000 worlds of 960 contacts.
    phones = [f"5511{n:09d}" for n in secrets.SystemRandom().sample(range(10**9), contacts)]
    with db.transaction() as s:
        s.add(Campaign(id=camp, user_id=uid, name="t", state=state, templates=list(templates),
                       settings=settings or {}, chip_ids=chip_ids if name_chip_ids else [],
                       total_contacts=contacts, pending_count=contacts, dispatch_epoch=epoch,
                       started_at=text("now()")))
        s.flush()
        if contacts:
            s.execute(insert(Contact), [
                {"campaign_id": camp, "phone": p, "chat_id": f"{p}@c.us", "name": f"Contact {i}",
                 "variables": variables if variables is not None else {"city": f"City{i}"}, "row_no": i}
                for i, p in enumerate(phones)])
            s.execute(text("""
                INSERT INTO campaign_messages (campaign_id, contact_id, chip_id, state, seq, template_index)
                SELECT :cid, ct.id, (CAST(:chips AS uuid[]))[((ct.row_no) % :n) + 1], 1, ct.row_no,
                       ct.row_no % :t
                FROM campaign_contacts ct WHERE ct.campaign_id = :cid"""),
                {"cid": str(camp), "chips": [str(c) for c in chip_ids], "n": chips, "t": len(templates)})
            credits.reserve(s, uid, camp, contacts, "test start")
        ids = [r[0] for r in s.execute(text(
            "SELECT id FROM campaign_messages WHERE campaign_id = :cid ORDER BY seq"), {"cid": str(camp)})]
    return World(uid, camp, chip_ids, ids, phones)


def campaign_row(db: Database, campaign_id: uuid.UUID) -> Any:
    with db.session() as s:
        return s.get(Campaign, campaign_id)


def message_rows(db: Database, campaign_id: uuid.UUID) -> list[Any]:
    with db.session() as s:
        return list(s.query(Message).filter(Message.campaign_id == campaign_id).order_by(Message.seq))


def set_messages(db: Database, ids: Sequence[int], **values: Any) -> None:
    """Force message columns (e.g. an expired lease) to set up a scenario."""
    with db.transaction() as s:
        s.query(Message).filter(Message.id.in_(list(ids))).update(values, synchronize_session=False)


def check_counters(db: Database, campaign_id: uuid.UUID) -> None:
    """The counters on the campaigns row equal a recount of the messages (package semantics)."""
    with db.session() as s:
        real = s.execute(text("""
            SELECT count(*) FILTER (WHERE state IN (1, 2)) AS pending_count,
                   count(*) FILTER (WHERE state IN (3, 4, 5)) AS sent_count,
                   count(*) FILTER (WHERE state IN (4, 5)) AS delivered_count,
                   count(*) FILTER (WHERE state = 5) AS read_count,
                   count(*) FILTER (WHERE state = 6) AS failed_count,
                   count(*) FILTER (WHERE state = 7) AS skipped_count
            FROM campaign_messages WHERE campaign_id = :cid"""), {"cid": str(campaign_id)}).one()._asdict()
        row = s.get(Campaign, campaign_id)
        assert row is not None
        kept = {k: getattr(row, k) for k in real}
    assert kept == real
