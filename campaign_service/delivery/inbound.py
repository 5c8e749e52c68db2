"""ReportInboundMessages: messages the chips received (WAHA `message` webhooks, forwarded by the
dispatcher's receiver). A text equal to one of the chip owner's opt-out words (trimmed, case and
accent insensitive, ops.suppressions.is_opt_out) adds the sender to that user's suppression list,
with an audit entry ("suppression.opt_out", actor "system:dispatcher") and opted_out_count + 1
on each of the user's campaigns that messaged the number, in one transaction per message.

The chip is found by its WAHA session name; when several chips (of different users, on
different WAHA servers) share that name, the receiving number (`chip_phone`) picks among them.
Idempotent on the WAHA message id (inbound_opt_outs): a webhook retried or replayed after the
user removed the number does not add it again. A newly applied opt-out of a user who set a
confirmation text answers a Reply for the dispatcher to send (at most once: a replay is a duplicate)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlalchemy.orm import Session

from campaign_service import audit, errors, outbox, phones
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.db.models import Chip
from campaign_service.dispatch import Lane, lane_for
from campaign_service.ops.suppressions import is_opt_out
from campaign_service.repository import suppressions as repo
from campaign_service.secrets_box import SecretBox
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.delivery.inbound")

MAX_MESSAGES = 1000
MAX_TEXT = 4096
MAX_ID = 200
OPT_OUT_ACTION = "suppression.opt_out"
ACTOR = "system:dispatcher"


class Inbound(NamedTuple):
    session: str
    chip_phone: str
    sender: str
    text: str
    waha_message_id: str
    time: datetime | None = None


@dataclass(frozen=True)
class Reply:
    """A confirmation reply to send for a newly applied opt-out (the user set a confirmation text)."""

    lane: Lane  # the receiving chip: where and how (its own pacing) the reply goes
    chat_id: str
    text: str
    reply_id: str


@dataclass(frozen=True)
class InboundResult:
    opted_out: int
    duplicates: int
    ignored: int
    replies: list[Reply] = field(default_factory=list)


def _digits(value: str) -> str:
    return "".join(ch for ch in value.split("@", 1)[0] if ch.isdigit())


def validate(messages: list[Inbound]) -> None:
    v: list[tuple[str, str]] = []
    if len(messages) > MAX_MESSAGES:
        v.append(("messages", f"at most {MAX_MESSAGES} per call"))
    for i, m in enumerate(messages):
        if not m.session:
            v.append((f"messages[{i}].session", "required"))
        if not m.sender:
            v.append((f"messages[{i}].sender", "required"))
        if not 1 <= len(m.waha_message_id) <= MAX_ID:
            v.append((f"messages[{i}].waha_message_id", f"must be 1-{MAX_ID} characters"))
    if v:
        raise errors.InvalidArgument(v)


def report_inbound(db: Database, settings: Settings, messages: list[Inbound]) -> InboundResult:
    validate(messages)
    opted = dup = ignored = 0
    replies: list[Reply] = []
    box = SecretBox(settings.secret_keys)
    for m in messages:
        got = _apply_one(db, settings, m, box, replies)
        opted += got == "opted_out"
        dup += got == "duplicate"
        ignored += got == "ignored"
    return InboundResult(opted, dup, ignored, replies)


def _apply_one(db: Database, settings: Settings, m: Inbound, box: SecretBox, replies: list[Reply]) -> str:
    if len(m.text) > MAX_TEXT or not m.text.strip() or m.sender.endswith(("@g.us", "@newsletter", "@broadcast")):
        return "ignored"  # no opt-out word is that long; groups and channels are nobody's number
    sender = phones.normalize(_digits(m.sender), settings.default_region) if _digits(m.sender) else None
    if not isinstance(sender, phones.Normalized):
        return "ignored"
    with db.transaction() as s:
        chips = repo.chips_for_session(s, m.session)
        mine = _digits(m.chip_phone)
        if len(chips) > 1 and mine:
            chips = [c for c in chips if c[2] == mine] or chips
        owners = list(dict.fromkeys(user for _, user, _ in chips))
        if not owners:
            return "ignored"
        result = "ignored"
        for user_id in owners:
            settings_row = repo.settings(s, user_id)
            if not is_opt_out(m.text, settings_row.words):
                continue
            key = _key(m.waha_message_id, user_id, len(owners))
            if not repo.claim_inbound(s, key, user_id, sender.digits):
                result = "duplicate" if result == "ignored" else result
                continue
            _opt_out(s, user_id, sender.digits, m)
            result = "opted_out"
            chip = s.get(Chip, next(c for c, user, _ in chips if user == user_id))
            if settings_row.confirmation_text and chip is not None and chip.state == res.CHIP_STATE_ACTIVE:
                replies.append(Reply(lane_for(chip, res.Pacing(), box), sender.chat_id,
                                     settings_row.confirmation_text, key))
    return result


def _key(waha_id: str, user_id: uuid.UUID, owners: int) -> str:
    return waha_id if owners == 1 else f"{waha_id}#{user_id}"


def _opt_out(s: Session, user_id: uuid.UUID, phone: str, m: Inbound) -> None:
    _, created = repo.add(s, user_id, phone, repo.OPT_OUT, f"replied {m.text.strip()[:40]!r}")
    campaigns = repo.count_opt_out(s, user_id, phone) if created else []
    audit.record(s, user_id=user_id, action=OPT_OUT_ACTION, entity_type="suppression", entity_id=phone,
                 description=f"{phone} opted out (replied {m.text.strip()[:40]!r} to chip session {m.session}).",
                 extra_data={"phone": phone, "text": m.text.strip()[:100], "session": m.session,
                             "waha_message_id": m.waha_message_id, "already_suppressed": not created,
                             "campaign_ids": [str(c) for c in campaigns]},
                 actor=ACTOR)
    for cid in campaigns:
        outbox.campaign_progress(s, cid)
    log.info("user=%s: %s opted out (%d campaign(s) counted)", user_id, phone, len(campaigns))

