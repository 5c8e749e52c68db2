"""Shared fixtures and helpers of the campaign_service tests (test_campaign_*, test_chip_*,
test_auth). No tests here; modules import what they use.

RUNNING campaigns in these tests send through chips on the WAHA sandbox with a 3600 s interval,
so each lane sends at most once and the campaign stays RUNNING for the length of the test."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import Api, phones
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

SLOW = (3600.0, 3600.0)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(database_url, pool_size=2)
    yield eng
    eng.dispose()


@pytest.fixture()
def api(campaign_channel: grpc.Channel, api_key: str) -> Api:
    return Api(campaign_channel, api_key)


@pytest.fixture()
def other_api(campaign_channel: grpc.Channel, create_user: Callable[..., str]) -> Api:
    return Api(campaign_channel, create_user())


@pytest.fixture()
def live(dispatcher_server: ServiceProcess, sandbox_url: str) -> str:
    """The dispatcher is up (Start succeeds); returns the sandbox URL for chips."""
    return sandbox_url


class Failure:
    """A failed RPC with its rich details unpacked."""

    def __init__(self, err: grpc.RpcError) -> None:
        self.code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
        self.message: str = err.details() or ""  # type: ignore[attr-defined]
        self.fields: list[str] = []
        self.reason = ""
        self.metadata: dict[str, str] = {}
        st = rpc_status.from_call(err)  # type: ignore[arg-type]
        for d in st.details if st is not None else []:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                self.fields += [v.field for v in br.field_violations]
            elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                ei = error_details_pb2.ErrorInfo()
                d.Unpack(ei)
                self.reason = ei.reason
                self.metadata = dict(ei.metadata)

    def __repr__(self) -> str:
        return f"Failure({self.code}, {self.message!r}, fields={self.fields}, reason={self.reason!r})"


def fails(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Failure:
    """Call an RPC that must fail; return its status."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as err:
        return Failure(err)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded but should have failed")


def slow_chip(api: Api, waha_url: str) -> res.Chip:
    """A chip whose lane sends at most once an hour."""
    return api.chip(waha_url, SANDBOX_API_KEY, interval=SLOW)


def draft(api: Api, chips: Iterable[res.Chip] = (), contacts: int = 0, name: str = "c") -> res.Campaign:
    camp = api.campaign(list(chips), name=name, interval=SLOW)
    if contacts:
        r = api.import_phones(camp.id, phones(contacts))
        assert r.imported_count == contacts
    return api.get(camp.id)


def running(api: Api, waha_url: str, contacts: int = 6, n_chips: int = 2, name: str = "running") -> res.Campaign:
    chips = [slow_chip(api, waha_url) for _ in range(n_chips)]
    camp = draft(api, chips, contacts, name=name)
    started = api.start(camp.id)
    assert started.state == res.CAMPAIGN_STATE_RUNNING
    return started


def paused(api: Api, waha_url: str, contacts: int = 6) -> res.Campaign:
    c = running(api, waha_url, contacts)
    return api.pause(c.id)


def cancelled(api: Api, waha_url: str, contacts: int = 6) -> res.Campaign:
    c = running(api, waha_url, contacts)
    return api.cancel(c.id)


def scheduled(api: Api, name: str = "scheduled") -> res.Campaign:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    ts.seconds += 86400
    c = api.campaigns.CreateCampaign(cs.CreateCampaignRequest(campaign=res.Campaign(
        name=name, templates=[res.MessageTemplate(text="hi")], schedule_time=ts)), metadata=api.md)
    assert c.state == res.CAMPAIGN_STATE_SCHEDULED
    return c


def completed(api: Api, engine: sa.Engine, waha_url: str) -> res.Campaign:
    """A COMPLETED campaign. Completion is the delivery side's automatic transition; here it is
    produced directly in the database (every message final, state COMPLETED)."""
    c = running(api, waha_url, contacts=3, n_chips=1)
    api.pause(c.id)  # no lane touches it any more
    with engine.begin() as conn:  # the campaign row first, as the services lock (a late report deadlocked)
        conn.execute(sa.text("SELECT 1 FROM campaigns WHERE id = :c FOR UPDATE"), {"c": c.id})
        conn.execute(sa.text("UPDATE campaign_messages SET state = 3, sent_at = now() WHERE campaign_id = :c"),
                     {"c": c.id})
        conn.execute(sa.text("UPDATE campaigns SET state = 6, completed_at = now(), sent_count = 3,"
                             " pending_count = 0 WHERE id = :c"), {"c": c.id})
    got = api.get(c.id)
    assert got.state == res.CAMPAIGN_STATE_COMPLETED
    return got


def row(engine: sa.Engine, table: str, id_: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        r = conn.execute(sa.text(f"SELECT * FROM {table} WHERE id = :i"), {"i": id_}).mappings().first()
    return dict(r) if r is not None else None


def count(engine: sa.Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def snapshot(engine: sa.Engine, user_key: str) -> dict[str, Any]:
    """Everything a user owns, to prove a refused request changed nothing."""
    import hashlib

    h = hashlib.sha256(user_key.encode()).hexdigest()
    with engine.connect() as conn:
        uid = conn.execute(sa.text("SELECT id FROM users WHERE api_key_hash = :h"), {"h": h}).scalar_one()
        out: dict[str, Any] = {"user": dict(conn.execute(sa.text("SELECT * FROM users WHERE id = :u"),
                                                         {"u": uid}).mappings().one())}
        for table, q in (
                ("campaigns", "SELECT * FROM campaigns WHERE user_id = :u ORDER BY id"),
                ("chips", "SELECT * FROM chips WHERE user_id = :u ORDER BY id"),
                ("contacts", "SELECT cc.* FROM campaign_contacts cc JOIN campaigns c ON c.id = cc.campaign_id"
                             " WHERE c.user_id = :u ORDER BY cc.id"),
                ("messages", "SELECT m.* FROM campaign_messages m JOIN campaigns c ON c.id = m.campaign_id"
                             " WHERE c.user_id = :u ORDER BY m.id")):
            out[table] = [dict(r) for r in conn.execute(sa.text(q), {"u": uid}).mappings()]
    return out


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
