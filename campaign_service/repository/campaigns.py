"""Campaign rows. Reads are one row (the counters live on it); lists use keyset pagination on
ix_campaigns_user_created / ix_campaigns_user_state_created."""

from __future__ import annotations

import uuid
from datetime import datetime
from time import monotonic
from typing import Any, NamedTuple

from sqlalchemy import Select, Text, bindparam, cast, delete, func, select, text, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.orm import Session

from campaign_service.db.aio import LoopReads
from campaign_service.db.engine import Database, Prepared
from campaign_service.db.models import Campaign

_c = Campaign.__table__.c
#: What the API view of a campaign needs (convert.campaign_view), typed for cheap rendering: ids as
#: text, and templates/settings as their JSON text (rendered once per distinct text, not per row).
VIEW_COLUMNS = (
    cast(_c.id, Text).label("id"), _c.name, _c.description, _c.state, _c.state_reason,
    cast(_c.templates, Text).label("templates_json"), cast(_c.settings, Text).label("settings_json"),
    cast(_c.chip_ids, ARRAY(Text)).label("chip_ids"), _c.schedule_time, _c.created_at, _c.updated_at,
    _c.started_at, _c.completed_at, _c.total_contacts, _c.pending_count, _c.sent_count, _c.delivered_count,
    _c.read_count, _c.failed_count, _c.skipped_count, _c.version,
    _c.opted_out_count)  # suppression



class CampaignView(NamedTuple):
    """A row of VIEW_COLUMNS (same names, same order)."""

    id: str
    name: str
    description: str
    state: int
    state_reason: str
    templates_json: str
    settings_json: str
    chip_ids: list[str]
    schedule_time: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    total_contacts: int
    pending_count: int
    sent_count: int
    delivered_count: int
    read_count: int
    failed_count: int
    skipped_count: int
    version: int
    opted_out_count: int  # suppression


assert CampaignView._fields == tuple(c.name for c in VIEW_COLUMNS)

#: One campaign's view from a thread (WatchCampaign's snapshot): prepared once per connection (see
#: Database.fetch_one). GetCampaign reads GET_CHANGED_VIEWS from the event loop.
GET_VIEW = Prepared("whago_get_campaign_view", str(select(*VIEW_COLUMNS).compile(dialect=postgresql.dialect()))
                    + " WHERE campaigns.id = $1 AND campaigns.user_id = $2", 2)


def _page_query(by_state: bool, keyset: bool) -> Select[Any]:
    q = select(*VIEW_COLUMNS).where(_c.user_id == bindparam("uid"))
    if by_state:
        q = q.where(_c.state == bindparam("state"))
    if keyset:
        q = q.where(tuple_(_c.created_at, _c.id) < tuple_(bindparam("after_t", type_=_c.created_at.type),
                                                           bindparam("after_id", type_=_c.id.type)))
    return q.order_by(_c.created_at.desc(), _c.id.desc()).limit(bindparam("lim"))


_PAGES = {(s, k): _page_query(s, k) for s in (False, True) for k in (False, True)}


def _positional(q: Select[Any]) -> tuple[str, tuple[str, ...]]:
    """A statement as asyncpg's SQL ($1..$n) and the names of its parameters in that order."""
    compiled = q.compile(dialect=asyncpg_dialect())
    return str(compiled), tuple(compiled.positiontup or ())


_PAGES_ON_LOOP = {key: _positional(q) for key, q in _PAGES.items()}


def page_statement(by_state: bool, keyset: bool) -> Select[Any]:
    """The statement `page_on_loop` runs (bound parameters uid, lim, state, after_t, after_id)."""
    return _PAGES[by_state, keyset]


def insert(session: Session, **fields: Any) -> Campaign:
    c = Campaign(id=uuid.uuid4(), **fields)
    session.add(c)
    session.flush()
    session.refresh(c)
    return c


def get(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, for_update: bool = False) -> Campaign | None:
    q = select(Campaign).where(Campaign.id == campaign_id, Campaign.user_id == user_id)
    if for_update:
        q = q.with_for_update()
    return session.execute(q).scalar_one_or_none()


def get_any(session: Session, campaign_id: uuid.UUID, *, for_update: bool = False) -> Campaign | None:
    """By id regardless of owner (internal callers: scheduler, delivery)."""
    q = select(Campaign).where(Campaign.id == campaign_id)
    if for_update:
        q = q.with_for_update()
    return session.execute(q).scalar_one_or_none()


def get_view(db: Database, user_id: uuid.UUID, campaign_id: uuid.UUID) -> CampaignView | None:
    """The VIEW_COLUMNS of one of the user's campaigns (from a thread)."""
    row = db.fetch_one(GET_VIEW, str(campaign_id), str(user_id))
    return None if row is None else CampaignView._make(row)


def _sql(expr: Any) -> str:
    return str(expr.compile(dialect=postgresql.dialect()))


#: Many campaigns at once by id ($1), each with its owner and its tuple version (xmin); the view
#: columns, as one ROW, only for a campaign whose xmin is not the one given for it in $2 (0: none).
#: An UPDATE always writes a new tuple version with its own transaction's xmin (and freezing keeps
#: the raw xmin), so an equal xmin is the very row version read before: nothing is decoded, sent or
#: rendered again for it — while PostgreSQL is still asked on every read.
GET_CHANGED_VIEWS = (
    "SELECT campaigns.id::text, campaigns.user_id, campaigns.xmin, CASE WHEN campaigns.xmin = "
    "($2::xid[])[array_position($1::uuid[], campaigns.id)] THEN NULL ELSE ROW("
    + ", ".join(_sql(getattr(c, "element", c)) for c in VIEW_COLUMNS)
    + ") END FROM campaigns WHERE campaigns.id = ANY($1::uuid[])")

ViewKey = tuple[str, uuid.UUID]  # (campaign id as text, owner)


def view_key(user_id: uuid.UUID, campaign_id: str) -> ViewKey:
    return campaign_id, user_id


class ChangedViews:
    """The views of many (campaign, owner) keys in one query from the event loop (see
    campaign_service.db.coalesce), asking PostgreSQL for the columns only of rows that changed
    since this process last read them (GET_CHANGED_VIEWS): the last view read of each campaign is
    kept with its xmin. An entry older than `max_age` is not offered as known (a transaction id
    repeats only after 2^32 transactions, far more than PostgreSQL runs in that time), so an equal
    xmin always means the same row version. Event loop only."""

    def __init__(self, reads: LoopReads, size: int = 20_000, max_age: float = 600.0) -> None:
        self._reads = reads
        self._size = size
        self._max_age = max_age
        self._seen: dict[str, tuple[int, CampaignView, float]] = {}

    async def fetch(self, keys: list[ViewKey]) -> dict[ViewKey, CampaignView]:
        seen, now = self._seen, monotonic()
        offered: dict[str, CampaignView] = {}  # the views whose xmin goes out as known
        known: list[int] = []
        for cid, _ in keys:
            held = seen.get(cid)
            if held is not None and held[2] > now:
                offered[cid] = held[1]
                known.append(held[0])
            else:
                known.append(0)
        rows = await self._reads.fetch_all(GET_CHANGED_VIEWS, [k[0] for k in keys], known)
        views: dict[str, tuple[uuid.UUID, CampaignView]] = {}
        for cid, owner, xmin, cols in rows:
            if cols is None:  # the row version offered: its view as it was when the query went out
                view = offered[cid]
            else:
                view = CampaignView._make(cols)
                if cid not in seen and len(seen) >= self._size:
                    del seen[next(iter(seen))]  # the oldest
                seen[cid] = (xmin, view, now + self._max_age)
            views[cid] = (owner, view)
        out: dict[ViewKey, CampaignView] = {}
        for key in keys:
            found = views.get(key[0])
            if found is not None and found[0] == key[1]:
                out[key] = found[1]
        return out


def _page_params(user_id: uuid.UUID, state: int, limit: int,
                 after: tuple[datetime, uuid.UUID] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"uid": user_id, "lim": limit}
    if state:
        params["state"] = state
    if after is not None:
        params["after_t"], params["after_id"] = after
    return params


async def page_on_loop(reads: LoopReads, user_id: uuid.UUID, state: int, limit: int,
                       after: tuple[datetime, uuid.UUID] | None) -> list[CampaignView]:
    """VIEW_COLUMNS rows, newest first, keyset-paginated after (created_at, id), from the event loop
    (asyncpg prepares each of the four statements once per connection)."""
    sql, names = _PAGES_ON_LOOP[bool(state), after is not None]
    params = _page_params(user_id, state, limit, after)
    return [CampaignView._make(r) for r in await reads.fetch_all(sql, *(params[n] for n in names))]


def touch(session: Session, c: Campaign) -> None:
    """Flush pending attribute changes with a version bump and a fresh updated_at, then reload."""
    c.version = c.version + 1
    c.updated_at = func.now()
    session.flush()
    session.refresh(c)


def delete_row(session: Session, campaign_id: uuid.UUID) -> int:
    return session.execute(delete(Campaign).where(Campaign.id == campaign_id)).rowcount  # type: ignore[attr-defined, no-any-return]


def count(session: Session, user_id: uuid.UUID) -> int:
    """The user's campaigns (for the quota; serialized per user by a transaction-scoped lock)."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": f"campaigns:{user_id}"})
    return int(session.execute(text("SELECT count(*) FROM campaigns WHERE user_id = :u"), {"u": user_id}).scalar_one())
