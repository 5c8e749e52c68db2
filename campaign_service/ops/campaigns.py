"""Campaign CRUD: create, get, list, update (DRAFT/SCHEDULED only) and delete (with its contacts,
messages, media and dispatch jobs)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from google.protobuf import field_mask_pb2
from sqlalchemy.orm import Session

from campaign_service import convert, errors, lifecycle, limits, outbox, pacing, pagination, templates
from campaign_service.config import Settings
from campaign_service.db.coalesce import Coalescer
from campaign_service.db.engine import Database
from campaign_service.db.models import Campaign
from campaign_service.dispatch import DispatcherClient
from campaign_service.ids import canonical_uuid, parse_uuid
from campaign_service.lifecycle import Op, State
from campaign_service.ops.base import OpsBase, utcnow
from campaign_service.ops.inputs import (
    MAX_DESCRIPTION,
    MAX_NAME,
    MAX_TEMPLATE_TEXT,
    MAX_TEMPLATES,
    UPDATABLE_PATHS,
    CampaignInput,
    DeleteResult,
    Idem,
    Page,
    Replayed,
)
from campaign_service.ops.media import remove_unused_files
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.repository import chips as chips_repo
from campaign_service.repository import contacts as contacts_repo
from campaign_service.repository import media as media_repo
from campaign_service.repository import messages as messages_repo
from campaign_service.repository import purges as purges_repo
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.campaigns")

#: How long a GetCampaign's read may wait for others to share its query, and for at most how many
#: (campaign_service.db.coalesce: only while reads are arriving together). Chosen under `make bench`
#: get (16 calls in flight): ~4-6 keys per query instead of ~1.5; 1 ms / 4 and 4 ms / 16 did no better.
READ_HOLD_S, READ_FILL = 0.002, 8


class CampaignCrud(OpsBase):
    """Create/Get/List/Update/DeleteCampaign."""

    def __init__(self, db: Database, settings: Settings, dispatcher: DispatcherClient) -> None:
        super().__init__(db, settings, dispatcher)
        #: GetCampaigns in flight together share one query (campaign_service.db.coalesce).
        self._views: Coalescer[campaigns_repo.ViewKey, campaigns_repo.CampaignView] = Coalescer(
            campaigns_repo.ChangedViews(db.loop_reads).fetch, hold=READ_HOLD_S, fill=READ_FILL)

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
                if len(t.text) > MAX_TEMPLATE_TEXT:
                    v.append((f"{prefix}.templates[{i}].text", f"at most {MAX_TEMPLATE_TEXT} characters"))
                if t.weight > templates.MAX_WEIGHT:
                    v.append((f"{prefix}.templates[{i}].weight", f"at most {templates.MAX_WEIGHT}"))
                if t.media_id:
                    try:
                        uuid.UUID(t.media_id)
                    except ValueError:
                        v.append((f"{prefix}.templates[{i}].media_id", "not a valid media id"))
            short = [(t.text, bool(t.media_id)) for t in spec.templates if len(t.text) <= MAX_TEMPLATE_TEXT]
            if len(short) == len(spec.templates):
                v.extend(templates.validate(short, f"{prefix}.templates"))
        if "settings" in ps or any(p.startswith("settings.") for p in ps):
            v.extend(pacing.validate_settings(spec.settings, f"{prefix}.settings"))
        if "chip_ids" in ps:
            for i, cid in enumerate(spec.chip_ids):
                try:
                    uuid.UUID(cid)
                except ValueError:
                    v.append((f"{prefix}.chip_ids[{i}]", f"not a valid chip id: {cid!r}"))
        if "schedule_time" in ps and spec.schedule_time is not None and spec.schedule_time <= utcnow():
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
            limits.check("campaigns", campaigns_repo.count(s, user_id), 1,
                         limits.for_user(s, self.settings, user_id).campaigns)
            chip_ids = self._validate_refs(s, user_id, None, spec, paths)
            state = State.SCHEDULED if spec.schedule_time is not None else State.DRAFT
            c = campaigns_repo.insert(
                s, user_id=user_id, name=spec.name.strip(), description=spec.description, state=int(state),
                templates=convert.templates_to_json(spec.templates), settings=convert.to_json(_new_settings(spec)),
                chip_ids=chip_ids, schedule_time=spec.schedule_time)
            self._campaign_changed(s, c, action="campaign.create", event=outbox.CAMPAIGN_CREATED,
                                   description=f"Campaign '{c.name}' created.",
                                   extra={"campaign_name": c.name, "status": state.name})
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s created (name: %s, state: %s)", c.id, c.name, state.name)
        return c

    async def get_campaign(self, user_id: uuid.UUID, campaign_id: str) -> campaigns_repo.CampaignView:
        """A row of campaigns_repo.VIEW_COLUMNS (render it with convert.campaign_view). On the event
        loop: see campaign_service.db.aio for why."""
        cid = canonical_uuid(campaign_id, "campaign_id")
        row = await self._views.get(campaigns_repo.view_key(user_id, cid))
        if row is None:
            raise errors.NotFound("campaign", cid)
        return row

    async def list_campaigns(self, user_id: uuid.UUID, state: int, page_size: int, page_token: str) -> Page:
        """campaigns_repo.CampaignView rows (render them with convert.campaign_view). On the event
        loop, like get_campaign."""
        size = pagination.page_size(page_size)
        if state and state not in State._value2member_map_:
            raise errors.InvalidArgument([("state", f"unknown state {state}")])
        after = pagination.decode_created_keyset(page_token, "campaigns", str(state))
        rows = await campaigns_repo.page_on_loop(self.db.loop_reads, user_id, state, size + 1, after)
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
            if "templates" in paths and c.total_contacts > 0:  # variables checked against the imported columns
                problems = templates.validate([(t.text, bool(t.media_id)) for t in patch.templates],
                                              "campaign.templates", set(c.variable_names))
                if problems:
                    raise errors.InvalidArgument(problems)
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
            self._campaign_changed(s, c, action="campaign.update", event=outbox.CAMPAIGN_UPDATED,
                                   description=f"Campaign '{c.name}' updated.",
                                   extra={"campaign_name": c.name, "status": State(c.state).name,
                                          "fields": sorted(paths)})
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s updated (%s)", c.id, ", ".join(paths))
        return c

    def delete_campaign(self, user_id: uuid.UUID, campaign_id: str, etag: str = "", idem: Idem | None = None
                        ) -> DeleteResult | Replayed:
        """The seed's Delete, in one transaction: status check, revoke jobs (CancelDispatch), media rows,
        messages, contacts, audit event, the campaign; files go after commit. A campaign of more than
        `delete_inline_rows` rows has its contacts and messages counted and queued for the purge
        thread instead (sweeps.py): the campaign is gone at commit all the same."""
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
            # media dedup: files are shared per user; only those no other row uses go (after commit)
            media_repo.lock_paths(s, paths)
            unused = media_repo.unused_paths(s, paths)
            log.info("%d media deleted from campaign %s (%d files unused)", len(paths), cid, len(unused))
            # One message per contact at most, so total_contacts bounds the rows (contacts and
            # messages are only created under this row's lock, which we hold: the counts are exact).
            rows = c.total_contacts * (2 if c.started_at is not None else 1)
            purged = rows > self.settings.delete_inline_rows
            if purged:
                n_messages, n_contacts = messages_repo.count(s, cid), contacts_repo.count(s, cid)
                purges_repo.queue(s, cid)
            else:
                n_messages, n_contacts = messages_repo.delete_all(s, cid), contacts_repo.delete_all(s, cid)
            later = " (removed in the background)" if purged else ""
            log.info("%d messages deleted from campaign %s%s", n_messages, cid, later)
            log.info("%d contacts deleted from campaign %s%s", n_contacts, cid, later)
            self._campaign_changed(s, c, action="campaign.delete", event=outbox.CAMPAIGN_DELETED,
                                   description=f"Campaign '{c.name}' deleted.",
                                   extra={"campaign_name": c.name, "status": state_name,
                                          "total_contacts": c.total_contacts, "deleted_contacts": n_contacts,
                                          "deleted_messages": n_messages, "deleted_media": len(paths),
                                          "deleted_media_files": len(unused), "revoked_jobs": revoked})
            s.expunge(c)
            campaigns_repo.delete_row(s, cid)
            result = DeleteResult(str(cid), n_contacts, n_messages, len(paths), revoked, len(unused))
            self._remember(s, user_id, idem, result)
        log.info("campaign %s deleted", cid)
        if not purged:
            self.db.stats.changed("campaign_messages", n_messages)
            self.db.stats.changed("campaign_contacts", n_contacts)
        self._remove_files(cid, unused)
        return result

    def _remove_files(self, campaign_id: uuid.UUID, paths: list[str]) -> None:
        root = self.settings.media_dir
        remove_unused_files(self.db, root, paths)
        try:
            (root / str(campaign_id)).rmdir()
        except OSError:
            pass


def _new_settings(spec: CampaignInput) -> res.CampaignSettings:
    """A new campaign's settings: number verification is on unless the request says otherwise."""
    settings = res.CampaignSettings()
    settings.CopyFrom(spec.settings)
    if not settings.HasField("verify_numbers"):
        settings.verify_numbers = True
    return settings


def _check_etag(c: Campaign, etag: str) -> None:
    """AIP-154: a stale etag is ABORTED; an empty one means "whatever the current version is"."""
    if etag and etag != convert.etag(c.version):
        raise errors.Aborted("ETAG_MISMATCH", f"etag {etag!r} is stale; the campaign is now "
                             f"{convert.etag(c.version)!r}: get it again and retry")
