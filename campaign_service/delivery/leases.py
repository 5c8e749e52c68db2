"""LeaseMessages: hand a lane (campaign, chip) its next due messages, rendered, under a lease;
LeaseLanes: the same for several lanes of a campaign in one transaction.

One transaction, four statements (the first once for all lanes, the others per lane): campaign row
FOR KEY SHARE (waits for a Pause/Cancel holding it FOR UPDATE, so a lane never leases across a
stop), the lease UPDATE (FOR UPDATE SKIP LOCKED, so concurrent lanes and replicas never get the
same message; it also says which numbers the owner suppressed), the lane heartbeat + remaining
count, and the media of the templates used."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from campaign_service import errors, metrics
from campaign_service.db import arrays
from campaign_service.db.engine import Database, PreparedText, execute_prepared
from campaign_service.delivery import opt_out
from campaign_service.delivery.common import (
    PENDING,
    RUNNING,
    SENDING,
    SET_LOCK_TIMEOUT,
    bounded_lock_wait,
    lock_timeout_param,
    parse_uuid,
)
from campaign_service.templates import TextRenderer, template_parts, text_renderer

MAX_MESSAGES = 1000
MAX_LEASE_SECONDS = 3600
MAX_RECLAIM_OWNERS = 8
MAX_OWNER_LENGTH = 200
MAX_WAHA_ID_LENGTH = 200


@dataclass(frozen=True)
class MediaInfo:
    id: uuid.UUID
    campaign_id: uuid.UUID
    filename: str
    mime_type: str
    size_bytes: int
    created_at: datetime
    path: str = ""
    kind: int = 0  # MediaKind sniffed at upload (0: a row from before sniffing)
    sha256: str = ""


class LeasedMessage(NamedTuple):
    """A NamedTuple, not a frozen dataclass: one per leased message, and a frozen dataclass's
    __init__ (object.__setattr__ per field) was a tenth of a lease's Python time."""

    message_id: int
    chat_id: str
    phone: str
    text: str
    media: MediaInfo | None
    waha_message_id: str | None
    attempts: int
    lease_expires_at: datetime
    attempt_waha_message_id: str | None = None
    verify_number: bool = False
    not_on_whatsapp: bool = False


@dataclass(frozen=True)
class LeaseResult:
    messages: list[LeasedMessage]
    campaign_state: int
    epoch: int
    remaining: int


# The lease's statements are prepared once per connection (db/engine.py PreparedText).
_CAMPAIGN = PreparedText.of("whago_lease_campaign", text(
    f"SELECT {SET_LOCK_TIMEOUT}, state, dispatch_epoch, templates, user_id,"
    " coalesce((settings->>'verifyNumbers')::boolean, false) AS verify FROM campaigns WHERE id = :cid"
    " FOR KEY SHARE"))
# Cached check-exists answers still fresh (found: 30 days, not found: 7 days).
_CHECKED = text("""
SELECT phone, on_whatsapp, chat_id FROM number_checks
WHERE user_id = :u AND phone = ANY(CAST(:phones AS text[]))
  AND checked_at > now() - CASE WHEN on_whatsapp THEN interval '30 days' ELSE interval '7 days' END""")

# Expired SENDING leases (a crashed or slow lane's), and those of owners the lane took over
# (`reclaim`: fenced out long enough that nothing of theirs is in the air), first in seq order
# together with PENDING ones.
# Two locking CTEs because FOR UPDATE is not allowed directly under UNION. `m.id = ANY(ARRAY(...))`
# pins the update to an index scan of the picked ids whatever the statistics say: right after a big
# campaign lands in a table last analyzed nearly empty, the planner (rows=1) otherwise walked the
# whole primary key once per lease (20-35 s per lease seen in `make bench`).
_LEASE = PreparedText.of("whago_lease", text(f"""
WITH expired AS (
    SELECT id, seq, waha_message_id, template_index, true AS expired FROM campaign_messages
    WHERE campaign_id = :cid AND chip_id = :chip AND state = {SENDING:d}
      AND (lease_expires_at < now() OR lease_owner = ANY(CAST(:reclaim AS text[])))
    ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED
), pending AS (
    SELECT id, seq, waha_message_id, template_index, false AS expired FROM campaign_messages
    WHERE campaign_id = :cid AND chip_id = :chip AND state = {PENDING:d}
    ORDER BY seq LIMIT :n FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id, seq, waha_message_id AS earlier, template_index, expired, row_number() OVER (ORDER BY seq) AS rn
    FROM (SELECT * FROM expired UNION ALL SELECT * FROM pending) u ORDER BY seq LIMIT :n
)
UPDATE campaign_messages m
SET state = {SENDING:d}, lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :secs),
    attempts = m.attempts + 1, updated_at = now(),
    waha_message_id = CASE
        WHEN picked.earlier IS NULL AND NOT (picked.template_index % :nt = ANY(CAST(:media_idx AS int[])))
        THEN (CAST(:wids AS text[]))[picked.rn] ELSE m.waha_message_id END
FROM picked, campaign_contacts ct
WHERE m.id = ANY(ARRAY(SELECT id FROM picked)) AND m.id = picked.id AND ct.id = m.contact_id
RETURNING m.id, m.seq, m.template_index, picked.earlier AS waha_message_id, m.waha_message_id AS attempt_id,
          m.attempts, m.lease_expires_at, m.contact_id, ct.phone, ct.chat_id, ct.name, ct.variables, picked.expired,
          EXISTS (SELECT 1 FROM suppressions sp WHERE sp.user_id = :uid AND sp.phone = ct.phone) AS suppressed
"""))

# Columns of _LEASE's RETURNING read on every row (by position: see lease_messages).
_SEQ_COL, _TEMPLATE_INDEX, _EXPIRED = 1, 2, 12
_SEQ = itemgetter(_SEQ_COL)

_HEARTBEAT_AND_REMAINING = PreparedText.of("whago_lease_heartbeat", text(f"""
WITH hb AS (
    INSERT INTO delivery_lanes (campaign_id, chip_id, last_seen_at, lease_seconds, lease_owner)
    VALUES (:cid, :chip, now(), :secs, :owner)
    ON CONFLICT (campaign_id, chip_id) DO UPDATE
    SET last_seen_at = now(), lease_seconds = EXCLUDED.lease_seconds, lease_owner = EXCLUDED.lease_owner,
        resume_at = NULL, resume_epoch = NULL
    RETURNING 1
)
SELECT count(*) FROM (
    SELECT 1 FROM campaign_messages WHERE campaign_id = :cid AND chip_id = :chip AND state = {PENDING:d}
      AND seq > :after
    LIMIT :count_cap) p
"""))

# `remaining` is counted up to remaining_cap(n): a lane only needs to size its next batch (at most
# 400 messages, or a few times a small batch while it ramps up) and to know whether work is left.
# Counting a big campaign's whole lane on every lease cost ~40 ms per lease (200k PENDING per
# lane), more than the lease itself; up to 1000 still cost ~1.3 ms of a 200-message lease's ~8.
# The count starts after the batch just leased (`after`: its highest seq): the PENDING entries
# before it in the lane index are the versions this very UPDATE replaced, visited for nothing.
REMAINING_CAP_MIN = 200


def remaining_cap(max_messages: int) -> int:
    return max(max_messages, REMAINING_CAP_MIN)


_REMAINING = text("SELECT count(*) FROM (SELECT 1 FROM campaign_messages WHERE campaign_id = :cid"
                  f" AND chip_id = :chip AND state = {PENDING:d} LIMIT :count_cap) p")

_MEDIA = text("""
SELECT id, campaign_id, filename, mime_type, size_bytes, created_at, path, kind, sha256 FROM campaign_media
WHERE campaign_id = :cid AND id = ANY(CAST(:ids AS uuid[]))""")

class LaneLease(NamedTuple):
    """One lane's lease request (LeaseMessagesRequest's fields)."""

    campaign_id: str
    chip_id: str
    epoch: int
    max_messages: int
    lease_seconds: int
    lease_owner: str = ""
    waha_message_ids: Sequence[str] = ()
    reclaim_owners: Sequence[str] = ()


# LeaseLanes: leases per call (each ~0.6 ms under the campaign row's share lock, which a Pause or
# Cancel waits for: 100 keep a call near 60 ms), and messages in all: no more than one LeaseMessages
# may carry, so a response stays under the server's send limit as a single lease's does (1000
# texts of 4096 characters are at most 16 MiB of the 20).
MAX_LANES = 100
MAX_LANES_MESSAGES = MAX_MESSAGES


def validate(lease: LaneLease, prefix: str = "") -> tuple[uuid.UUID, uuid.UUID]:
    """The lease's (campaign, chip) ids; InvalidArgument naming every bad field (`prefix`: its
    place in a LeaseLanes request)."""
    violations: list[tuple[str, str]] = []
    ids: list[uuid.UUID] = []
    for name, value in (("campaign_id", lease.campaign_id), ("chip_id", lease.chip_id)):
        try:
            ids.append(parse_uuid(value, prefix + name))
        except errors.InvalidArgument as e:
            violations += e.violations
    if not 1 <= lease.max_messages <= MAX_MESSAGES:
        violations.append((prefix + "max_messages", f"must be between 1 and {MAX_MESSAGES}"))
    if not 1 <= lease.lease_seconds <= MAX_LEASE_SECONDS:
        violations.append((prefix + "lease_seconds", f"must be between 1 and {MAX_LEASE_SECONDS}"))
    wids, owners = lease.waha_message_ids, lease.reclaim_owners
    if len(wids) > MAX_MESSAGES:
        violations.append((prefix + "waha_message_ids", f"at most {MAX_MESSAGES} ids"))
    bad = next((i for i, w in enumerate(wids) if not w or len(w) > MAX_WAHA_ID_LENGTH), None)
    if bad is not None:
        violations.append((f"{prefix}waha_message_ids[{bad}]", f"must be 1-{MAX_WAHA_ID_LENGTH} characters"))
    if len(owners) > MAX_RECLAIM_OWNERS:
        violations.append((prefix + "reclaim_owners", f"at most {MAX_RECLAIM_OWNERS} owners"))
    bad = next((i for i, o in enumerate(owners) if not o or len(o) > MAX_OWNER_LENGTH), None)
    if bad is not None:
        violations.append((f"{prefix}reclaim_owners[{bad}]", f"must be 1-{MAX_OWNER_LENGTH} characters"))
    if violations:
        raise errors.InvalidArgument(violations)
    return ids[0], ids[1]


def validate_lanes(leases: Sequence[LaneLease]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """LeaseLanes' campaign and each lease's chip. Stops at the first invalid lease (a hundred
    leases' violations would make a status too large for its trailer)."""
    if not 1 <= len(leases) <= MAX_LANES:
        raise errors.InvalidArgument([("leases", f"must hold 1-{MAX_LANES} leases")])
    cid, chip = validate(leases[0], "leases[0].")
    chips = [chip]
    for i, lease in enumerate(leases[1:], 1):
        other, chip = validate(lease, f"leases[{i}].")
        if other != cid:
            raise errors.InvalidArgument([(f"leases[{i}].campaign_id", "must be leases[0]'s: one campaign per call")])
        chips.append(chip)
    total = sum(lease.max_messages for lease in leases)
    if total > MAX_LANES_MESSAGES:
        raise errors.InvalidArgument([("leases", f"max_messages add up to {total}; at most {MAX_LANES_MESSAGES}")])
    return cid, chips


def lease_messages(db: Database, campaign_id: str, chip_id: str, epoch: int, max_messages: int,
                   lease_seconds: int, lease_owner: str, waha_message_ids: Sequence[str] = (),
                   reclaim_owners: Sequence[str] = ()) -> LeaseResult:
    """Lease up to max_messages of the lane; nothing unless RUNNING under the current epoch.

    `waha_message_ids`: ids taken up front, recorded on the leased messages (in send order) in the
    same statement, as ATTEMPTING would (not on messages with an earlier attempt's id, nor media).
    `reclaim_owners`: earlier owners the lane took over; their leases count as expired."""
    lease = LaneLease(campaign_id, chip_id, epoch, max_messages, lease_seconds, lease_owner, waha_message_ids,
                      reclaim_owners)
    cid, chip = validate(lease)
    return _lease(db, cid, [(chip, lease)], "LeaseMessages")[0]


def lease_lanes(db: Database, leases: Sequence[LaneLease]) -> list[LeaseResult]:
    """Each lease as lease_messages would take it, all in one transaction: the campaign row is read
    (and share-locked) once, and one commit serves every lane. A worker's lanes starting together
    each paid a transaction and an RPC of their own (~2 ms of CPU a lease on the two services)."""
    cid, chips = validate_lanes(leases)
    return _lease(db, cid, list(zip(chips, leases, strict=True)), "LeaseLanes")


def _lease(db: Database, cid: uuid.UUID, lanes: list[tuple[uuid.UUID, LaneLease]], rpc: str) -> list[LeaseResult]:
    with bounded_lock_wait(rpc), db.transaction() as s:
        camp = execute_prepared(s, _CAMPAIGN, {"cid": str(cid), **lock_timeout_param()}).one_or_none()
        if camp is None:
            raise errors.NotFound("campaign", lanes[0][1].campaign_id)
        templates = camp.templates or []
        media_idx = arrays.int_literal(
            [i for i in range(len(templates)) if template_parts(templates, i)[1] is not None])
        rendering: dict[int, _Template] = {}  # compiled once a call, whatever lane uses it
        out = [_lease_lane(s, camp, cid, chip, lease, media_idx, rendering) for chip, lease in lanes]
    metrics.leases(len(out))
    return out


_Template = tuple[TextRenderer, uuid.UUID | None]  # a template's renderer and its media id


def _lease_lane(s: Session, camp: Row[Any], cid: uuid.UUID, chip: uuid.UUID, lease: LaneLease,
                media_idx: str, rendering: dict[int, _Template]) -> LeaseResult:
    """One lane's lease within the transaction that read (and share-locked) its campaign row."""
    params = {"cid": str(cid), "chip": str(chip)}
    n, secs, owner = lease.max_messages, lease.lease_seconds, lease.lease_owner
    if camp.state != RUNNING or camp.dispatch_epoch != lease.epoch:
        remaining = s.execute(_REMAINING, {**params, "count_cap": remaining_cap(n)}).scalar_one()
        return LeaseResult([], camp.state, camp.dispatch_epoch, remaining)
    templates = camp.templates or []
    lease_params = {**params, "n": n, "secs": secs, "owner": owner or None,
                    "wids": arrays.literal(lease.waha_message_ids), "nt": max(1, len(templates)),
                    "reclaim": arrays.literal(lease.reclaim_owners), "media_idx": media_idx, "uid": camp.user_id}
    rows = list(execute_prepared(s, _LEASE, lease_params).all())  # fetchall, not a fetchone per row
    # suppression: messages to numbers the owner suppressed become SKIPPED (OPTED_OUT), not leased
    rows = opt_out.skip_suppressed(s, cid, rows, lambda: list(execute_prepared(s, _LEASE, lease_params).all()))
    rows.sort(key=_SEQ)
    metrics.leased(len(rows), sum(1 for r in rows if r[_EXPIRED]))
    remaining = execute_prepared(s, _HEARTBEAT_AND_REMAINING, {
        **params, "secs": secs, "owner": owner or "", "count_cap": remaining_cap(n),
        "after": rows[-1][_SEQ_COL] if rows else 0}).scalar_one()
    indexes = [r[_TEMPLATE_INDEX] for r in rows]
    for i in set(indexes).difference(rendering):
        txt, mid = template_parts(templates, i)
        rendering[i] = (text_renderer(txt), mid)
    parts = [rendering[i] for i in indexes]
    media = _media(s, cid, {m for _, m in parts if m is not None})
    checked: dict[str, tuple[bool, str]] = {}
    if camp.verify and rows:
        checked = {c.phone: (c.on_whatsapp, c.chat_id)
                   for c in s.execute(_CHECKED, {"u": camp.user_id, "phones": [r.phone for r in rows]})}
    verify = camp.verify
    # Rows unpacked in _LEASE's RETURNING order: a Row's attribute access costs ~0.4 us, and
    # ten per message were half of this loop.
    leased = [
        LeasedMessage(message_id, _chat_id(chat_id, checked.get(phone)) if verify else chat_id, phone,
                      render(name, phone, variables, contact_id),
                      media.get(mid) if mid is not None else None, earlier, attempts, expires,
                      None if earlier else attempt_id, verify and phone not in checked,
                      verify and not checked.get(phone, (True, ""))[0])
        for (message_id, _seq, _tidx, earlier, attempt_id, attempts, expires, contact_id, phone, chat_id, name,
             variables, _expired, _suppressed), (render, mid) in zip(rows, parts, strict=True)
    ]
    return LeaseResult(leased, camp.state, camp.dispatch_epoch, remaining)


def _chat_id(contact_chat_id: str, check: tuple[bool, str] | None) -> str:
    """The chat id WAHA answered when the number was checked (it knows whether a Brazilian mobile
    carries the ninth digit); the contact's own otherwise."""
    return check[1] if check is not None and check[0] and check[1] else contact_chat_id


def _media(s: Session, cid: uuid.UUID, ids: set[uuid.UUID]) -> dict[uuid.UUID, MediaInfo]:
    if not ids:
        return {}
    return {r.id: MediaInfo(r.id, r.campaign_id, r.filename, r.mime_type, r.size_bytes, r.created_at, r.path,
                            r.kind, r.sha256 or "")
            for r in s.execute(_MEDIA, {"cid": str(cid), "ids": [str(i) for i in ids]})}
