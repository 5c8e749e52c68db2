"""Domain operations of campaign_service, one transaction each. The servicers only translate
protobuf <-> these; the scheduler and DeliveryService may call them too (e.g. `start_campaign`).

Lifecycle operations lock the campaign row (SELECT ... FOR UPDATE), check the transition
(lifecycle.py), bump dispatch_epoch and talk to the dispatcher:

- Pause, Cancel and Delete call the dispatcher BEFORE commit: if it fails the transaction rolls
  back (UNAVAILABLE) and the campaign stays as it was. The dispatcher's stop waits only for WAHA
  HTTP requests in flight, never for our row lock, so holding it is safe.
- Start and Resume commit first and then call StartDispatch: lanes lease messages as soon as
  they exist, and must see the committed RUNNING state and messages (a lane that leased before
  our commit would see DRAFT and stop). If StartDispatch fails, a compensating transaction puts
  the campaign back exactly as it was (messages removed, credits refunded, same version), and
  the bumped epoch fences any lane the dispatcher might still have enqueued.

Mutating operations take an optional Idem (AIP-155): the response bytes are stored in the same
transaction, and a retry with the same request_id gets them back as Replayed.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from google.protobuf import field_mask_pb2
from sqlalchemy.orm import Session

from campaign_service import audit, convert, errors, lifecycle, pacing, pagination, phones
from campaign_service.config import Settings
from campaign_service.db.engine import Database
from campaign_service.db.models import Campaign, Chip, Contact, Media
from campaign_service.dispatch import DispatcherClient, Lane
from campaign_service.events import Events
from campaign_service.ids import parse_uuid
from campaign_service.lifecycle import Op, State
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.repository import chips as chips_repo
from campaign_service.repository import contacts as contacts_repo
from campaign_service.repository import idempotency
from campaign_service.repository import media as media_repo
from campaign_service.repository import messages as messages_repo
from campaign_service.repository import users as users_repo
from campaign_service.repository.messages import MessageRow
from campaign_service.states import ChipState, MessageState
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.campaigns")
T = TypeVar("T")

CANCEL_REASON = "cancelled by user"
MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_TEMPLATES = 50
MAX_TEMPLATE_TEXT = 4096
MAX_MEDIA_BYTES = 16 * 1024 * 1024
MAX_REJECTED_REPORTED = 1000
MAX_CONTACT_NAME = 1000
MAX_REQUEST_ID = 200
COPY_BATCH = 5_000  # rows per piece handed to the COPY thread

UPDATABLE_PATHS = ("name", "description", "templates", "settings", "chip_ids", "schedule_time")


# ----------------------------------------------------------------------------------------------
# Inputs and results


@dataclass(frozen=True)
class Idem:
    """An AIP-155 request id and how to serialize the operation's response for replays."""

    request_id: str
    method: str
    encode: Callable[[Any], bytes]


@dataclass(frozen=True)
class Replayed:
    """The stored response of an earlier request with the same request_id."""

    data: bytes


@dataclass
class CampaignInput:
    name: str = ""
    description: str = ""
    templates: list[res.MessageTemplate] = field(default_factory=list)
    settings: res.CampaignSettings = field(default_factory=res.CampaignSettings)
    chip_ids: list[str] = field(default_factory=list)
    schedule_time: datetime | None = None
    has_settings: bool = False


@dataclass
class ChipInput:
    display_name: str = ""
    phone: str = ""
    waha_base_url: str = ""
    waha_session: str = ""
    waha_api_key: str = ""
    proxy_label: str = ""
    pacing: res.Pacing = field(default_factory=res.Pacing)


class ContactRow(NamedTuple):
    """One row to import (a NamedTuple: cheap to build a million of)."""

    phone: str
    name: str
    variables: dict[str, str]


class ContactLike(Protocol):
    """What import reads of a row: a ContactRow, or the ContactInput message itself (no copy)."""

    @property
    def phone(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def variables(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class ImportChunk:
    """One message of the ImportContacts stream."""

    campaign_id: str
    rows: Sequence[ContactLike]
    default_region: str = ""


@dataclass(frozen=True)
class Rejected:
    row: int
    phone: str
    reason: str


@dataclass
class ImportResult:
    imported: int = 0
    duplicates: int = 0
    rejected_count: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    total_contacts: int = 0


@dataclass(frozen=True)
class DeleteResult:
    campaign_id: str
    deleted_contacts: int
    deleted_messages: int
    deleted_media: int
    revoked_jobs: int


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_page_token: str


# ----------------------------------------------------------------------------------------------
# Small helpers




def _utcnow() -> datetime:
    return datetime.now(UTC)


def _check_request_id(idem: Idem | None) -> None:
    if idem is not None and len(idem.request_id) > MAX_REQUEST_ID:
        raise errors.InvalidArgument([("request_id", f"at most {MAX_REQUEST_ID} characters")])


_SAFE_NAME = re.compile(r"[^\w.\- ]+")


def _safe_filename(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    return _SAFE_NAME.sub("_", base)[:255]


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def mask_paths(mask: field_mask_pb2.FieldMask | None, patch: CampaignInput, *, settings_set: bool) -> list[str]:
    """The update paths: the mask's, or (AIP-134) every populated updatable field when it is empty.
    Unknown or output-only paths are INVALID_ARGUMENT on update_mask."""
    if mask is None or not mask.paths:
        paths = [p for p, present in (
            ("name", bool(patch.name)), ("description", bool(patch.description)),
            ("templates", bool(patch.templates)), ("settings", settings_set),
            ("chip_ids", bool(patch.chip_ids)), ("schedule_time", patch.schedule_time is not None)) if present]
        if not paths:
            raise errors.InvalidArgument([("update_mask", "no field to update")])
        return paths
    out: list[str] = []
    for p in mask.paths:
        if p == "*":
            out.extend(UPDATABLE_PATHS)
            continue
        if p in UPDATABLE_PATHS:
            out.append(p)
            continue
        if p.startswith("settings.") and _settings_subpath_ok(p[len("settings."):]):
            out.append(p)
            continue
        raise errors.InvalidArgument([("update_mask", f"unknown or read-only path {p!r}; updatable: "
                                       f"{', '.join(UPDATABLE_PATHS)} and settings.*")])
    return list(dict.fromkeys(out))


def _settings_subpath_ok(sub: str) -> bool:
    desc = res.CampaignSettings.DESCRIPTOR
    parts = sub.split(".")
    for i, part in enumerate(parts):
        f = desc.fields_by_name.get(part)
        if f is None:
            return False
        if i < len(parts) - 1:
            if f.message_type is None:
                return False
            desc = f.message_type
    return True


# ----------------------------------------------------------------------------------------------
# The service


class CampaignOps:
    """All campaign, contact, media and chip operations. Thread-safe (one transaction per call)."""

    def __init__(self, db: Database, settings: Settings, dispatcher: DispatcherClient,
                 events: Events | None = None) -> None:
        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.events = events

    # -- infrastructure -------------------------------------------------------------------------

    def _replay(self, s: Session, user_id: uuid.UUID, idem: Idem | None) -> Replayed | None:
        if idem is None or not idem.request_id:
            return None
        _check_request_id(idem)
        prior = idempotency.claim(s, user_id, idem.request_id, idem.method)
        if prior is None:
            return None
        if prior.method != idem.method:
            raise errors.InvalidArgument([("request_id", f"already used for {prior.method}")])
        log.info("request_id=%s replayed for %s", idem.request_id, idem.method)
        return Replayed(prior.response)

    @staticmethod
    def _remember(s: Session, user_id: uuid.UUID, idem: Idem | None, result: Any) -> None:
        if idem is not None and idem.request_id:
            idempotency.store(s, user_id, idem.request_id, idem.encode(result))

    @staticmethod
    def _campaign(s: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, lock: bool = False) -> Campaign:
        c = campaigns_repo.get(s, user_id, campaign_id, for_update=lock)
        if c is None:
            raise errors.NotFound("campaign", str(campaign_id))
        return c

    def _publish(self, user_id: uuid.UUID, campaign_id: str, state: str, webhook_url: str | None,
                 reason: str = "", extra: dict[str, object] | None = None) -> None:
        if self.events is None:
            return
        try:
            self.events.campaign_status(user_id=user_id, campaign_id=campaign_id, state=state, reason=reason,
                                        webhook_url=webhook_url, extra=extra)
        except Exception as exc:  # best effort: the database is the truth
            log.warning("campaign=%s status event failed: %s", campaign_id, exc)

    # -- validation -----------------------------------------------------------------------------

    def _validate_fields(self, spec: CampaignInput, paths: Iterable[str], prefix: str = "campaign") -> None:
        """Request-only checks (no database), for the paths being written."""
        v: list[tuple[str, str]] = []
        ps = set(paths)
        if "name" in ps:
            if not spec.name.strip():
                v.append((f"{prefix}.name", "required"))
            elif len(spec.name) > MAX_NAME:
                v.append((f"{prefix}.name", f"at most {MAX_NAME} characters"))
        if "description" in ps and len(spec.description) > MAX_DESCRIPTION:
            v.append((f"{prefix}.description", f"at most {MAX_DESCRIPTION} characters"))
        if "templates" in ps:
            if len(spec.templates) > MAX_TEMPLATES:
                v.append((f"{prefix}.templates", f"at most {MAX_TEMPLATES} templates"))
            for i, t in enumerate(spec.templates):
                if not t.text.strip() and not t.media_id:
                    v.append((f"{prefix}.templates[{i}].text", "text or media_id is required"))
                if len(t.text) > MAX_TEMPLATE_TEXT:
                    v.append((f"{prefix}.templates[{i}].text", f"at most {MAX_TEMPLATE_TEXT} characters"))
                if t.media_id:
                    try:
                        uuid.UUID(t.media_id)
                    except ValueError:
                        v.append((f"{prefix}.templates[{i}].media_id", "not a valid media id"))
        if "settings" in ps or any(p.startswith("settings.") for p in ps):
            v.extend(pacing.validate_settings(spec.settings, f"{prefix}.settings"))
        if "chip_ids" in ps:
            for i, cid in enumerate(spec.chip_ids):
                try:
                    uuid.UUID(cid)
                except ValueError:
                    v.append((f"{prefix}.chip_ids[{i}]", f"not a valid chip id: {cid!r}"))
        if "schedule_time" in ps and spec.schedule_time is not None and spec.schedule_time <= _utcnow():
            v.append((f"{prefix}.schedule_time", "must be in the future"))
        if v:
            raise errors.InvalidArgument(v)

    @staticmethod
    def _validate_refs(s: Session, user_id: uuid.UUID, campaign_id: uuid.UUID | None, spec: CampaignInput,
                       paths: Iterable[str], prefix: str = "campaign") -> list[uuid.UUID]:
        """Checks against the database: chips must be the caller's, media the campaign's."""
        ps = set(paths)
        v: list[tuple[str, str]] = []
        chip_ids = [uuid.UUID(c) for c in spec.chip_ids]
        if "chip_ids" in ps and chip_ids:
            owned = chips_repo.owned_ids(s, user_id, chip_ids)
            for i, cid in enumerate(chip_ids):
                if cid not in owned:
                    v.append((f"{prefix}.chip_ids[{i}]", f"unknown chip {cid}"))
        if "templates" in ps:
            media_ids = media_repo.ids_of_campaign(s, campaign_id) if campaign_id else set()
            for i, t in enumerate(spec.templates):
                if t.media_id and str(uuid.UUID(t.media_id)) not in media_ids:
                    v.append((f"{prefix}.templates[{i}].media_id",
                              "unknown media: upload it to this campaign first"))
        if v:
            raise errors.InvalidArgument(v)
        return list(dict.fromkeys(chip_ids))

    # -- CRUD -----------------------------------------------------------------------------------

    def create_campaign(self, user_id: uuid.UUID, spec: CampaignInput, idem: Idem | None = None
                        ) -> Campaign | Replayed:
        paths = [*UPDATABLE_PATHS]
        self._validate_fields(spec, paths)
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            chip_ids = self._validate_refs(s, user_id, None, spec, paths)
            state = State.SCHEDULED if spec.schedule_time is not None else State.DRAFT
            c = campaigns_repo.insert(
                s, user_id=user_id, name=spec.name.strip(), description=spec.description, state=int(state),
                templates=convert.templates_to_json(spec.templates), settings=convert.to_json(spec.settings),
                chip_ids=chip_ids, schedule_time=spec.schedule_time)
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s created (name: %s, state: %s)", c.id, c.name, state.name)
        return c

    def get_campaign(self, user_id: uuid.UUID, campaign_id: str) -> campaigns_repo.CampaignView:
        """A row of campaigns_repo.VIEW_COLUMNS (render it with convert.campaign_view)."""
        cid = parse_uuid(campaign_id, "campaign_id")
        row = campaigns_repo.get_view(self.db, user_id, cid)
        if row is None:
            raise errors.NotFound("campaign", str(cid))
        return row

    def list_campaigns(self, user_id: uuid.UUID, state: int, page_size: int, page_token: str) -> Page:
        """Rows of campaigns_repo.VIEW_COLUMNS (render them with convert.campaign_view)."""
        size = pagination.page_size(page_size)
        if state and state not in State._value2member_map_:
            raise errors.InvalidArgument([("state", f"unknown state {state}")])
        after = pagination.decode_created_keyset(page_token, "campaigns", str(state))
        with self.db.read() as conn:
            rows = campaigns_repo.page(conn, user_id, state, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("campaigns", str(state), [rows[-1].created_at.isoformat(), rows[-1].id])
        return Page(rows, token)

    def update_campaign(self, user_id: uuid.UUID, campaign_id: str, patch: CampaignInput, paths: list[str],
                        etag: str = "", idem: Idem | None = None) -> Campaign | Replayed:
        """Apply `paths` of `patch` (see mask_paths). DRAFT/SCHEDULED only; schedule_time moves the
        campaign between the two."""
        cid = parse_uuid(campaign_id, "campaign.id")
        self._validate_fields(patch, paths)
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            _check_etag(c, etag)
            lifecycle.check(Op.UPDATE, c.state)
            chip_ids = self._validate_refs(s, user_id, cid, patch, paths)
            for p in paths:
                if p == "name":
                    c.name = patch.name.strip()
                elif p == "description":
                    c.description = patch.description
                elif p == "templates":
                    c.templates = convert.templates_to_json(patch.templates)
                elif p == "chip_ids":
                    c.chip_ids = chip_ids
                elif p == "schedule_time":
                    c.schedule_time = patch.schedule_time
                    c.state = int(lifecycle.state_after_schedule(c.state, patch.schedule_time is not None))
            settings_paths = [p[len("settings."):] for p in paths if p.startswith("settings.")]
            if "settings" in paths:
                c.settings = convert.to_json(patch.settings)
            elif settings_paths:
                merged = convert.settings_from_json(c.settings)
                field_mask_pb2.FieldMask(paths=settings_paths).MergeMessage(
                    patch.settings, merged, replace_message_field=True, replace_repeated_field=True)
                problems = pacing.validate_settings(merged, "campaign.settings")
                if problems:
                    raise errors.InvalidArgument(problems)
                c.settings = convert.to_json(merged)
            campaigns_repo.touch(s, c)
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s updated (%s)", c.id, ", ".join(paths))
        return c

    def delete_campaign(self, user_id: uuid.UUID, campaign_id: str, etag: str = "", idem: Idem | None = None
                        ) -> DeleteResult | Replayed:
        """The seed's Delete, in one transaction: status check, revoke jobs (CancelDispatch), media rows,
        messages, contacts, audit event, the campaign; files go after commit."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            _check_etag(c, etag)
            lifecycle.check(Op.DELETE, c.state)
            state_name = State(c.state).name
            log.info("deleting campaign %s (name: %s)", cid, c.name)
            revoked = 0
            if c.started_at is not None:
                c.dispatch_epoch += 1
                s.flush()
                outcome = self.dispatcher.cancel(str(cid), c.dispatch_epoch)
                revoked = outcome.revoked_jobs + outcome.aborted_jobs
                log.info("dispatch jobs revoked for campaign %s (revoked=%d, aborted=%d)", cid,
                         outcome.revoked_jobs, outcome.aborted_jobs)
            else:
                log.info("no dispatch jobs to revoke for campaign %s (never started)", cid)
            paths = media_repo.delete_all(s, cid)
            log.info("%d media deleted from campaign %s", len(paths), cid)
            n_messages = messages_repo.delete_all(s, cid)
            log.info("%d messages deleted from campaign %s", n_messages, cid)
            n_contacts = contacts_repo.delete_all(s, cid)
            log.info("%d contacts deleted from campaign %s", n_contacts, cid)
            audit.record(s, user_id=user_id, action="campaign.delete", entity_type="campaign", entity_id=str(cid),
                         description=f"Campaign '{c.name}' deleted.",
                         extra_data={"campaign_name": c.name, "status": state_name,
                                     "total_contacts": c.total_contacts, "deleted_contacts": n_contacts,
                                     "deleted_messages": n_messages, "deleted_media": len(paths),
                                     "revoked_jobs": revoked})
            webhook = users_repo.webhook_url(s, user_id)
            s.expunge(c)
            campaigns_repo.delete_row(s, cid)
            result = DeleteResult(str(cid), n_contacts, n_messages, len(paths), revoked)
            self._remember(s, user_id, idem, result)
        log.info("campaign %s deleted", cid)
        self.db.stats.changed("campaign_messages", n_messages)
        self.db.stats.changed("campaign_contacts", n_contacts)
        self._remove_files(cid, paths)
        self._publish(user_id, str(cid), "DELETED", webhook, extra={
            "deleted_contacts": n_contacts, "deleted_messages": n_messages, "deleted_media": len(paths)})
        return result

    def _remove_files(self, campaign_id: uuid.UUID, paths: list[str]) -> None:
        root = self.settings.media_dir
        for rel in paths:
            try:
                (root / rel).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("campaign=%s media file %s not removed: %s", campaign_id, rel, exc)
        try:
            (root / str(campaign_id)).rmdir()
        except OSError:
            pass

    # -- lifecycle ------------------------------------------------------------------------------

    def _lanes(self, chips: list[Chip], settings: res.CampaignSettings) -> list[Lane]:
        return [Lane(chip_id=str(ch.id), waha_base_url=ch.waha_base_url, waha_session=ch.waha_session,
                     waha_api_key=ch.waha_api_key,
                     pacing=pacing.effective(convert.pacing_from_json(ch.pacing), settings.pacing))
                for ch in chips]

    def start_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                       ) -> Campaign | Replayed:
        """DRAFT/SCHEDULED -> RUNNING: debit credits, create one message per contact (round-robin over
        the usable chips, one statement), commit, then StartDispatch (compensated if it fails)."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.START, c.state)
            templates = convert.templates_from_json(c.templates)
            if not templates:
                raise errors.FailedPrecondition("NO_TEMPLATES", "the campaign needs at least one template to start",
                                                {"campaign_id": str(cid)})
            if c.total_contacts <= 0:
                raise errors.FailedPrecondition("NO_CONTACTS", "the campaign has no contacts: import some first",
                                                {"campaign_id": str(cid)})
            chips = chips_repo.usable(s, user_id, c.chip_ids)
            if not chips:
                raise errors.FailedPrecondition(
                    "NO_USABLE_CHIP", "no usable chip: register a chip or choose ACTIVE chips in chip_ids",
                    {"campaign_id": str(cid)})
            settings = convert.settings_from_json(c.settings)
            lanes = self._lanes(chips, settings)
            need = c.total_contacts
            if users_repo.debit(s, user_id, need) is None:
                have = users_repo.balance(s, user_id)
                raise errors.FailedPrecondition(
                    "INSUFFICIENT_CREDITS", f"starting needs {need} credits, the account has {have}",
                    {"required": str(need), "available": str(have)})
            created = messages_repo.create_for_start(s, cid, [ch.id for ch in chips], len(templates),
                                                     settings.shuffle_contacts)
            if created != need:  # counters drifted: trust the rows, charge what was created
                users_repo.credit(s, user_id, need - created)
            before = _Snapshot.of(c)
            c.state = int(State.RUNNING)
            c.state_reason = ""
            c.started_at = _utcnow()
            c.pending_count = created
            c.dispatch_epoch += 1
            campaigns_repo.touch(s, c)
            audit.record(s, user_id=user_id, action="campaign.start", entity_type="campaign", entity_id=str(cid),
                         description=f"Campaign '{c.name}' started.",
                         extra_data={"campaign_name": c.name, "status": State(before.state).name,
                                     "messages": created, "chips": [str(ch.id) for ch in chips],
                                     "epoch": c.dispatch_epoch})
            webhook = users_repo.webhook_url(s, user_id)
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s start: %d messages over %d chips, epoch %d", cid, created, len(chips),
                 c.dispatch_epoch)
        self.db.stats.changed("campaign_messages", created)
        try:
            self.dispatcher.start(str(cid), c.dispatch_epoch, lanes, pacing.effective_camouflage(settings.camouflage))
        except errors.Unavailable:
            self._undo_start(user_id, cid, c.dispatch_epoch, before, created, idem)
            raise
        log.info("campaign=%s RUNNING (dispatch epoch %d)", cid, c.dispatch_epoch)
        self._publish(user_id, str(cid), State.RUNNING.name, webhook, extra={"messages": created})
        return c

    def _undo_start(self, user_id: uuid.UUID, cid: uuid.UUID, epoch: int, before: _Snapshot, created: int,
                    idem: Idem | None) -> None:
        """StartDispatch failed: put the campaign back as it was (unless something moved it meanwhile)."""
        with self.db.transaction() as s:
            c = self._campaign(s, user_id, cid, lock=True)
            if c.state != State.RUNNING or c.dispatch_epoch != epoch:
                return
            messages_repo.delete_all(s, cid)
            users_repo.credit(s, user_id, created)
            before.restore(c)
            s.flush()
            audit.record(s, user_id=user_id, action="campaign.start_reverted", entity_type="campaign",
                         entity_id=str(cid), description="Start reverted: the dispatcher was unavailable.",
                         extra_data={"epoch": epoch})
            if idem is not None and idem.request_id:
                idempotency.forget(s, user_id, idem.request_id)
        log.warning("campaign=%s start reverted: dispatcher unavailable", cid)

    def pause_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                       ) -> Campaign | Replayed:
        """RUNNING -> PAUSED. Returns once the dispatcher guarantees no further send; PENDING messages
        stay PENDING, leased ones return to PENDING through lease expiry or the lanes' release."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.PAUSE, c.state)
            c.dispatch_epoch += 1
            c.state = int(State.PAUSED)
            c.state_reason = "paused by user"
            campaigns_repo.touch(s, c)
            self.dispatcher.pause(str(cid), c.dispatch_epoch)
            audit.record(s, user_id=user_id, action="campaign.pause", entity_type="campaign", entity_id=str(cid),
                         description=f"Campaign '{c.name}' paused.",
                         extra_data={"campaign_name": c.name, "status": State.RUNNING.name,
                                     "pending": c.pending_count, "epoch": c.dispatch_epoch})
            webhook = users_repo.webhook_url(s, user_id)
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s PAUSED (dispatch epoch %d, %d pending)", cid, c.dispatch_epoch, c.pending_count)
        self._publish(user_id, str(cid), State.PAUSED.name, webhook, reason=c.state_reason)
        return c

    def resume_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                        ) -> Campaign | Replayed:
        """PAUSED -> RUNNING under a new epoch; lanes lease only PENDING messages, so none is sent twice."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.RESUME, c.state)
            before = _Snapshot.of(c)
            chip_ids = messages_repo.open_chip_ids(s, cid)
            chips = chips_repo.by_ids(s, user_id, chip_ids)
            settings = convert.settings_from_json(c.settings)
            lanes = self._lanes([ch for ch in chips if ch.state != ChipState.RESTRICTED], settings)
            c.dispatch_epoch += 1
            c.state_reason = ""
            if not chip_ids:
                # Nothing left to send (paused at the very end): the automatic transition applies.
                c.state = int(State.COMPLETED)
                c.completed_at = _utcnow()
                c.pending_count = 0
            else:
                if not lanes:
                    raise errors.FailedPrecondition(
                        "NO_USABLE_CHIP", "every chip of this campaign is restricted or deleted",
                        {"campaign_id": str(cid)})
                c.state = int(State.RUNNING)
            campaigns_repo.touch(s, c)
            audit.record(s, user_id=user_id, action="campaign.resume", entity_type="campaign", entity_id=str(cid),
                         description=f"Campaign '{c.name}' resumed.",
                         extra_data={"campaign_name": c.name, "status": State.PAUSED.name,
                                     "epoch": c.dispatch_epoch})
            webhook = users_repo.webhook_url(s, user_id)
            self._remember(s, user_id, idem, c)
        if c.state == State.RUNNING:
            try:
                self.dispatcher.start(str(cid), c.dispatch_epoch, lanes,
                                      pacing.effective_camouflage(settings.camouflage))
            except errors.Unavailable:
                self._undo_resume(user_id, cid, c.dispatch_epoch, before, idem)
                raise
        log.info("campaign=%s %s (dispatch epoch %d)", cid, State(c.state).name, c.dispatch_epoch)
        self._publish(user_id, str(cid), State(c.state).name, webhook)
        return c

    def _undo_resume(self, user_id: uuid.UUID, cid: uuid.UUID, epoch: int, before: _Snapshot,
                     idem: Idem | None) -> None:
        with self.db.transaction() as s:
            c = self._campaign(s, user_id, cid, lock=True)
            if c.state != State.RUNNING or c.dispatch_epoch != epoch:
                return
            before.restore(c)
            s.flush()
            if idem is not None and idem.request_id:
                idempotency.forget(s, user_id, idem.request_id)
        log.warning("campaign=%s resume reverted: dispatcher unavailable", cid)

    def cancel_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                        ) -> Campaign | Replayed:
        """The seed's Cancel: CancelDispatch (the job-cancel RPC), PENDING/SENDING/FAILED -> FAILED with
        "cancelled by user" in one statement, refund of unsent messages, completed_at, CANCELLED."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.CANCEL, c.state)
            previous = State(c.state)
            c.dispatch_epoch += 1
            s.flush()
            revoked = aborted = 0
            if c.started_at is not None:
                outcome = self.dispatcher.cancel(str(cid), c.dispatch_epoch)
                revoked, aborted = outcome.revoked_jobs, outcome.aborted_jobs
                log.info("dispatch jobs revoked for campaign %s (revoked=%d, aborted=%d)", cid, revoked, aborted)
            failed = messages_repo.fail_open(s, cid, CANCEL_REASON)
            if failed.were_open:
                users_repo.credit(s, user_id, failed.were_open)
            c.failed_count += failed.were_open
            c.pending_count = 0
            c.state = int(State.CANCELLED)
            c.state_reason = CANCEL_REASON
            c.completed_at = _utcnow()
            campaigns_repo.touch(s, c)
            audit.record(s, user_id=user_id, action="campaign.cancel", entity_type="campaign", entity_id=str(cid),
                         description=f"Campaign '{c.name}' cancelled.",
                         extra_data={"campaign_name": c.name, "status": previous.name,
                                     "total_contacts": c.total_contacts, "failed_messages": failed.failed,
                                     "refunded_credits": failed.were_open, "revoked_jobs": revoked,
                                     "aborted_jobs": aborted})
            webhook = users_repo.webhook_url(s, user_id)
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s CANCELLED (%d messages failed, %d credits refunded)", cid, failed.failed,
                 failed.were_open)
        self._publish(user_id, str(cid), State.CANCELLED.name, webhook, reason=CANCEL_REASON,
                      extra={"failed_count": c.failed_count})
        return c

    def start_scheduled(self, campaign_id: uuid.UUID) -> Campaign | None:
        """For the scheduler: start a SCHEDULED campaign on behalf of its owner (None if it is gone or no
        longer SCHEDULED). Raises like start_campaign otherwise."""
        with self.db.session() as s:
            c = campaigns_repo.get_any(s, campaign_id)
        if c is None or c.state != State.SCHEDULED:
            return None
        out = self.start_campaign(c.user_id, str(campaign_id))
        return out if isinstance(out, Campaign) else None

    # -- contacts -------------------------------------------------------------------------------

    def import_contacts(self, user_id: uuid.UUID, chunks: Iterator[ImportChunk]) -> ImportResult:
        """Stream rows in, normalize in Python (cached libphonenumber) while one COPY (in a helper thread)
        takes the rows, merge duplicates with ON CONFLICT DO NOTHING; one transaction holding the
        campaign row lock."""
        first = next(chunks, None)
        if first is None:
            raise errors.InvalidArgument([("campaign_id", "required on the first message")])
        cid = parse_uuid(first.campaign_id, "campaign_id")
        region = (first.default_region or self.settings.default_region).upper()
        if not phones.valid_region(region):
            raise errors.InvalidArgument([("default_region", f"unknown region {region!r}")])
        out = ImportResult()
        with self.db.transaction() as s:
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.IMPORT, c.state)
            direct = c.total_contacts == 0 and contacts_repo.count(s, cid) == 0
            offset = 0 if direct else contacts_repo.max_row_no(s, cid)
            if not direct:
                contacts_repo.begin_import(s)
            seen: set[int] = set()
            batch: list[contacts_repo.Row] = []
            row = 0
            normalize = phones.normalize
            sink = contacts_repo.CopyStream(s, cid, direct)
            try:
                for chunk in self._chain(first, chunks, first.campaign_id):
                    for r in chunk.rows:
                        row += 1
                        got = normalize(r.phone, region)
                        if isinstance(got, str):
                            reason = got
                        elif len(r.name) > MAX_CONTACT_NAME:
                            reason = f"name longer than {MAX_CONTACT_NAME} characters"
                        else:
                            key = int(got.digits)
                            if key in seen:
                                out.duplicates += 1
                            else:
                                seen.add(key)
                                batch.append((got.digits, got.chat_id, r.name, r.variables, offset + row))
                            continue
                        out.rejected_count += 1
                        if len(out.rejected) < MAX_REJECTED_REPORTED:
                            out.rejected.append(Rejected(row, r.phone, reason))
                    if len(batch) >= COPY_BATCH:
                        sink.send(batch)
                        batch = []
                sink.send(batch)
                staged = sink.finish()
            except BaseException:
                sink.abort()
                raise
            inserted = staged if direct else contacts_repo.finish_import(s, cid)
            out.imported = inserted
            out.duplicates += staged - inserted
            c.total_contacts += inserted
            out.total_contacts = c.total_contacts
            campaigns_repo.touch(s, c)
        log.info("campaign=%s import: %d rows, %d new, %d duplicates, %d rejected, %d contacts", cid, row,
                 out.imported, out.duplicates, out.rejected_count, out.total_contacts)
        self.db.stats.changed("campaign_contacts", out.imported)
        return out

    @staticmethod
    def _chain(first: ImportChunk, rest: Iterator[ImportChunk], campaign_id: str) -> Iterator[ImportChunk]:
        yield first
        for chunk in rest:
            if chunk.campaign_id and chunk.campaign_id != campaign_id:
                raise errors.InvalidArgument([("campaign_id", "must match the first message of the stream")])
            yield chunk

    def list_contacts(self, user_id: uuid.UUID, campaign_id: str, page_size: int, page_token: str) -> Page:
        cid = parse_uuid(campaign_id, "campaign_id")
        size = pagination.page_size(page_size)
        cursor = pagination.decode(page_token, "contacts", str(cid))
        after = self._int_cursor(cursor)
        with self.db.session() as s:
            self._campaign(s, user_id, cid)
            rows: list[Contact] = contacts_repo.page(s, cid, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("contacts", str(cid), [rows[-1].id])
        return Page(rows, token)

    def list_messages(self, user_id: uuid.UUID, campaign_id: str, state: int, page_size: int,
                      page_token: str) -> Page:
        cid = parse_uuid(campaign_id, "campaign_id")
        size = pagination.page_size(page_size)
        if state and state not in MessageState._value2member_map_:
            raise errors.InvalidArgument([("state", f"unknown state {state}")])
        cursor = pagination.decode(page_token, "messages", f"{cid}/{state}")
        after = self._int_cursor(cursor)
        with self.db.session() as s:
            self._campaign(s, user_id, cid)
            rows: list[MessageRow] = messages_repo.page(s, cid, state, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("messages", f"{cid}/{state}", [rows[-1].id])
        return Page(rows, token)

    @staticmethod
    def _int_cursor(cursor: list[Any] | None) -> int:
        if cursor is None:
            return 0
        if len(cursor) != 1 or not isinstance(cursor[0], int):
            raise errors.InvalidArgument([("page_token", "malformed page token")])
        return cursor[0]

    # -- media ----------------------------------------------------------------------------------

    def upload_media(self, user_id: uuid.UUID, campaign_id: str, filename: str, mime_type: str, content: bytes,
                     idem: Idem | None = None) -> Media | Replayed:
        """Store the file under media_dir/<campaign>/<media id> (atomically) and its row; the file is
        removed again if the transaction does not commit."""
        cid = parse_uuid(campaign_id, "campaign_id")
        v: list[tuple[str, str]] = []
        name = _safe_filename(filename)
        if not name:
            v.append(("filename", "required"))
        mime = mime_type.strip() or (mimetypes.guess_type(name)[0] or "")
        if not mime or "/" not in mime:
            v.append(("mime_type", "required (e.g. image/jpeg)"))
        if not content:
            v.append(("content", "empty file"))
        elif len(content) > MAX_MEDIA_BYTES:
            v.append(("content", f"at most {MAX_MEDIA_BYTES} bytes (16 MiB)"))
        if v:
            raise errors.InvalidArgument(v)
        path: Path | None = None
        try:
            with self.db.transaction() as s:
                if (r := self._replay(s, user_id, idem)) is not None:
                    return r
                c = self._campaign(s, user_id, cid, lock=True)
                lifecycle.check(Op.UPLOAD_MEDIA, c.state)
                mid = uuid.uuid4()
                rel = f"{cid}/{mid}"
                path = self.settings.media_dir / rel
                write_atomically(path, content)
                m = media_repo.insert(s, media_id=mid, campaign_id=cid, filename=name, mime_type=mime,
                                      size_bytes=len(content), path=rel)
                self._remember(s, user_id, idem, m)
        except BaseException:
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            raise
        log.info("campaign=%s media %s uploaded (%s, %d bytes)", cid, m.id, mime, m.size_bytes)
        return m

    def list_media(self, user_id: uuid.UUID, campaign_id: str) -> list[Media]:
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.session() as s:
            self._campaign(s, user_id, cid)
            return media_repo.of_campaign(s, cid)

    # -- chips ----------------------------------------------------------------------------------

    def register_chip(self, user_id: uuid.UUID, spec: ChipInput, idem: Idem | None = None) -> Chip | Replayed:
        v: list[tuple[str, str]] = []
        phone = phones.chip_phone(spec.phone, self.settings.default_region) if spec.phone.strip() else None
        if not spec.phone.strip():
            v.append(("chip.phone", "required"))
        elif phone is None:
            v.append(("chip.phone", f"not a phone number: {spec.phone!r}"))
        url = spec.waha_base_url.strip().rstrip("/")
        if not url:
            v.append(("chip.waha_base_url", "required"))
        elif not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            v.append(("chip.waha_base_url", "must be an http(s) URL, e.g. http://127.0.0.1:3000"))
        if not spec.waha_session.strip():
            v.append(("chip.waha_session", "required"))
        elif not re.fullmatch(r"[\w.\-]{1,100}", spec.waha_session.strip()):
            v.append(("chip.waha_session", "letters, digits, '_', '-' and '.' only"))
        if len(spec.display_name) > MAX_NAME:
            v.append(("chip.display_name", f"at most {MAX_NAME} characters"))
        if any(ord(c) < 32 or ord(c) == 127 for c in spec.waha_api_key):
            v.append(("chip.waha_api_key", "no control characters (it is sent as an HTTP header)"))
        v.extend(pacing.validate_pacing(spec.pacing, "chip.pacing"))
        if v:
            raise errors.InvalidArgument(v)
        assert phone is not None
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            dup = chips_repo.same_number(s, user_id, phone, url, spec.waha_session.strip())
            if dup is not None:
                # Pacing is per chip: two chips for one number would send at twice its pace.
                raise errors.AlreadyExists(
                    "CHIP_ALREADY_REGISTERED", f"this WhatsApp number is already registered as chip {dup[0].id} "
                    f"({'same phone' if dup[1] == 'chip.phone' else 'same WAHA server and session'})",
                    {"field": dup[1], "chip_id": str(dup[0].id)})
            chip = chips_repo.insert(s, user_id=user_id, display_name=spec.display_name.strip(), phone=phone,
                                     waha_base_url=url, waha_session=spec.waha_session.strip(),
                                     waha_api_key=spec.waha_api_key, proxy_label=spec.proxy_label.strip(),
                                     pacing=convert.to_json(spec.pacing))
            self._remember(s, user_id, idem, chip)
        log.info("chip=%s registered (phone %s, session %s)", chip.id, chip.phone, chip.waha_session)
        return chip

    def get_chip(self, user_id: uuid.UUID, chip_id: str) -> Chip:
        chid = parse_uuid(chip_id, "chip_id")
        with self.db.session() as s:
            chip = chips_repo.get(s, user_id, chid)
        if chip is None:
            raise errors.NotFound("chip", str(chid))
        return chip

    def list_chips(self, user_id: uuid.UUID, page_size: int, page_token: str) -> Page:
        size = pagination.page_size(page_size)
        after = pagination.decode_created_keyset(page_token, "chips", "")
        with self.db.session() as s:
            rows = chips_repo.page(s, user_id, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("chips", "", [rows[-1].created_at.isoformat(), str(rows[-1].id)])
        return Page(rows, token)

    def delete_chip(self, user_id: uuid.UUID, chip_id: str) -> None:
        """Refused while a RUNNING or PAUSED campaign sends through the chip."""
        chid = parse_uuid(chip_id, "chip_id")
        with self.db.transaction() as s:
            chip = chips_repo.get(s, user_id, chid)
            if chip is None:
                raise errors.NotFound("chip", str(chid))
            busy = chips_repo.in_use(s, user_id, chid)
            if busy:
                raise errors.FailedPrecondition(
                    "CHIP_IN_USE", f"chip is used by {len(busy)} running or paused campaign(s): cancel them first",
                    {"campaign_ids": ",".join(str(b) for b in busy)})
            chips_repo.delete(s, chip)
            audit.record(s, user_id=user_id, action="chip.delete", entity_type="chip", entity_id=str(chid),
                         description=f"Chip {chip.phone} deleted.", extra_data={"phone": chip.phone})
        log.info("chip=%s deleted", chid)


@dataclass(frozen=True)
class _Snapshot:
    """The fields Start/Resume change, to put them back when the dispatcher cannot be reached."""

    state: int
    state_reason: str
    started_at: datetime | None
    completed_at: datetime | None
    pending_count: int
    version: int
    updated_at: datetime

    @classmethod
    def of(cls, c: Campaign) -> _Snapshot:
        return cls(c.state, c.state_reason, c.started_at, c.completed_at, c.pending_count, c.version, c.updated_at)

    def restore(self, c: Campaign) -> None:
        c.state = self.state
        c.state_reason = self.state_reason
        c.started_at = self.started_at
        c.completed_at = self.completed_at
        c.pending_count = self.pending_count
        c.version = self.version
        c.updated_at = self.updated_at


def _check_etag(c: Campaign, etag: str) -> None:
    """AIP-154: a stale etag is ABORTED; an empty one means "whatever the current version is"."""
    if etag and etag != convert.etag(c.version):
        raise errors.Aborted("ETAG_MISMATCH", f"etag {etag!r} is stale; the campaign is now "
                             f"{convert.etag(c.version)!r}: get it again and retry")
