"""The lifecycle moves a user asks for: Start, Pause, Resume, Cancel (and the scheduler's start).

Lifecycle operations lock the campaign row (SELECT ... FOR UPDATE), check the transition
(lifecycle.py), bump dispatch_epoch and talk to the dispatcher:

- Pause, Cancel and Delete call the dispatcher BEFORE commit: if it fails the transaction rolls
  back (UNAVAILABLE) and the campaign stays as it was. The dispatcher's stop waits only for WAHA
  HTTP requests in flight, never for our row lock, so holding it is safe. Pause and Cancel send
  the stop first and write the campaign's own rows while it drains, then await its confirmation:
  under 1,000 lanes the drain (the worker answering for its requests in flight) and Cancel's
  message update each took ~100-300 ms, and they no longer add up.
- Start and Resume commit first and then call StartDispatch: lanes lease messages as soon as
  they exist, and must see the committed RUNNING state and messages (a lane that leased before
  our commit would see DRAFT and stop). If StartDispatch fails, a compensating transaction puts
  the campaign back exactly as it was (messages removed, reservation released, same version), and
  the bumped epoch fences any lane the dispatcher might still have enqueued.

Mutating operations take an optional Idem (AIP-155): the response bytes are stored in the same
transaction, and a retry with the same request_id gets them back as Replayed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from campaign_service import audit, auth, convert, errors, lifecycle, outbox, pacing
from campaign_service import templates as message_templates
from campaign_service.db.models import Campaign, Chip
from campaign_service.dispatch import Lane, lane_for
from campaign_service.ids import parse_uuid
from campaign_service.lifecycle import Op, State
from campaign_service.ops import start_messages
from campaign_service.ops.base import OpsBase, utcnow
from campaign_service.ops.inputs import CANCEL_REASON, Idem, Replayed
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.repository import chips as chips_repo
from campaign_service.repository import contacts as contacts_repo
from campaign_service.repository import credits as credits_repo
from campaign_service.repository import idempotency
from campaign_service.repository import messages as messages_repo
from campaign_service.repository import suppressions as suppressions_repo
from campaign_service.repository.messages import StartPlan
from campaign_service.secrets_box import SecretBox
from campaign_service.states import ChipState
from whago.campaign.v1 import resources_pb2 as res

log = logging.getLogger("campaign_service.campaigns")


class CampaignLifecycle(OpsBase):
    """Start/Pause/Resume/CancelCampaign and the scheduler's start of a SCHEDULED campaign."""

    def _lanes(self, chips: list[Chip], settings: res.CampaignSettings) -> list[Lane]:
        box = SecretBox(self.settings.secret_keys)
        return [lane_for(ch, settings.pacing, box) for ch in chips]

    def start_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                       ) -> Campaign | Replayed:
        """DRAFT/SCHEDULED -> RUNNING: create one message per contact (round-robin over the usable
        chips, one statement, or several in parallel for a big campaign: start_messages.py), reserve
        one credit per message (one RESERVE ledger entry), commit, then StartDispatch (compensated
        if it fails)."""
        cid = parse_uuid(campaign_id, "campaign_id")
        apart = False  # messages committed apart from this transaction (start_messages)
        try:
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
                self._check_variables(s, c, templates)
                chips = chips_repo.usable(s, user_id, c.chip_ids)
                if not chips:
                    raise errors.FailedPrecondition(
                        "NO_USABLE_CHIP", "no usable chip: register a chip or choose ACTIVE chips in chip_ids",
                        {"campaign_id": str(cid)})
                settings = convert.settings_from_json(c.settings)
                lanes = self._lanes(chips, settings)
                # A cheap early refusal; the reservation below (after the messages exist, so the users
                # row stays locked only until commit) is the exact check under concurrent Starts.
                suppressed = suppressions_repo.suppressed_contacts(s, user_id, cid)  # suppression
                have = credits_repo.balance(s, user_id)
                if have is None or have.available < c.total_contacts - len(suppressed):
                    raise _insufficient(c.total_contacts - len(suppressed), have.available if have else 0)
                plan = StartPlan(cid, [ch.id for ch in chips],
                                 message_templates.weight_pattern([t.weight for t in templates]),
                                 settings.shuffle_contacts)
                parts, minimum = self.settings.start_parallel, self.settings.start_parallel_min
                apart = start_messages.is_parallel(c.total_contacts, parts, minimum)
                created = start_messages.write(self.db, s, plan, c.total_contacts, parts, minimum)
                # suppression: messages to suppressed numbers are SKIPPED (OPTED_OUT) and reserve nothing.
                skipped = suppressions_repo.skip_contacts(s, cid, suppressed)
                created -= skipped
                # One credit per message created (the rows, not the counter, are the truth).
                if credits_repo.reserve(s, user_id, cid, created, f"start of campaign '{c.name}': {created} message(s)"
                                        ) is None:
                    now = credits_repo.balance(s, user_id)
                    raise _insufficient(created, now.available if now else 0)
                before = _Snapshot.of(c)
                c.state = int(State.RUNNING)
                c.state_reason = ""
                c.started_at = utcnow()
                c.pending_count = created
                c.skipped_count += skipped  # suppression
                c.dispatch_epoch += 1
                campaigns_repo.touch(s, c)
                self._campaign_changed(s, c, action="campaign.start", event=outbox.CAMPAIGN_STARTED,
                                       description=f"Campaign '{c.name}' started.",
                                       extra={"campaign_name": c.name, "status": State(before.state).name,
                                              "messages": created, "chips": [str(ch.id) for ch in chips],
                                              "skipped_opted_out": skipped,
                                              "epoch": c.dispatch_epoch})
                self._remember(s, user_id, idem, c)
        except BaseException:
            if apart:
                start_messages.discard(self.db, cid)
            raise
        log.info("campaign=%s start: %d messages over %d chips, epoch %d", cid, created, len(chips),
                 c.dispatch_epoch)
        self.db.stats.changed("campaign_messages", created)
        try:
            self.dispatcher.start(str(cid), c.dispatch_epoch, lanes, pacing.effective_camouflage(settings.camouflage))
        except errors.Unavailable:
            self._undo_start(user_id, cid, c.dispatch_epoch, before, created, idem)
            raise
        log.info("campaign=%s RUNNING (dispatch epoch %d)", cid, c.dispatch_epoch)
        return c

    @staticmethod
    def _check_variables(s: Session, c: Campaign, templates: list[res.MessageTemplate]) -> None:
        """At Start at the latest, every variable is known and has a value (or a default) for
        every contact: nothing renders to a silent empty string."""
        problems = message_templates.validate([(t.text, bool(t.media_id)) for t in templates], "campaign.templates",
                                              set(c.variable_names))
        if problems:
            raise errors.FailedPrecondition(
                "TEMPLATE_VARIABLES", "; ".join(f"{f}: {d}" for f, d in problems), {"field": problems[0][0]})
        required = message_templates.required_variables([t.text for t in templates]) - {"phone"}
        for name, missing in contacts_repo.missing_values(s, c.id, sorted(required)).items():
            if missing:
                raise errors.FailedPrecondition(
                    "MISSING_VARIABLE_VALUES",
                    f"{missing} contact(s) have no {name}, and {{{{{name}}}}} has no default: write "
                    f"{{{{{name}|...}}}} or import the values", {"variable": name, "contacts": str(missing)})

    def _undo_start(self, user_id: uuid.UUID, cid: uuid.UUID, epoch: int, before: _Snapshot, created: int,
                    idem: Idem | None) -> None:
        """StartDispatch failed: put the campaign back as it was (unless something moved it meanwhile)."""
        with self.db.transaction() as s:
            c = self._campaign(s, user_id, cid, lock=True)
            if c.state != State.RUNNING or c.dispatch_epoch != epoch:
                return
            unsent = messages_repo.count_open(s, cid)  # all of them, unless a fenced lane raced us
            messages_repo.delete_all(s, cid)
            credits_repo.release(s, user_id, cid, unsent, "start reverted (dispatcher unavailable): "
                                 f"{unsent} message(s) removed")
            credits_repo.fold(s, user_id, cid)
            before.restore(c)
            c.skipped_count = 0  # suppression: Start's SKIPPED (OPTED_OUT) messages are gone too
            s.flush()
            self._campaign_changed(s, c, action="campaign.start_reverted", event=outbox.CAMPAIGN_REVERTED,
                                   description="Start reverted: the dispatcher was unavailable.",
                                   extra={"epoch": epoch})
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
            stopped = self.dispatcher.begin_pause(str(cid), c.dispatch_epoch)
            c.state = int(State.PAUSED)
            c.state_reason = "paused by user"
            campaigns_repo.touch(s, c)
            self._campaign_changed(s, c, action="campaign.pause", event=outbox.CAMPAIGN_PAUSED,
                                   description=f"Campaign '{c.name}' paused.",
                                   extra={"campaign_name": c.name, "status": State.RUNNING.name,
                                          "pending": c.pending_count, "epoch": c.dispatch_epoch})
            self._remember(s, user_id, idem, c)
            stopped()  # confirmed before commit (UNAVAILABLE rolls everything back)
        log.info("campaign=%s PAUSED (dispatch epoch %d, %d pending)", cid, c.dispatch_epoch, c.pending_count)
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
                c.completed_at = utcnow()
                c.pending_count = 0
            else:
                if not lanes:
                    raise errors.FailedPrecondition(
                        "NO_USABLE_CHIP", "every chip of this campaign is restricted or deleted",
                        {"campaign_id": str(cid)})
                c.state = int(State.RUNNING)
            campaigns_repo.touch(s, c)
            self._campaign_changed(
                s, c, action="campaign.resume",
                event=outbox.CAMPAIGN_RESUMED if c.state == State.RUNNING else outbox.CAMPAIGN_COMPLETED,
                description=f"Campaign '{c.name}' resumed.",
                extra={"campaign_name": c.name, "status": State.PAUSED.name, "epoch": c.dispatch_epoch})
            self._remember(s, user_id, idem, c)
        if c.state == State.RUNNING:
            try:
                self.dispatcher.start(str(cid), c.dispatch_epoch, lanes,
                                      pacing.effective_camouflage(settings.camouflage))
            except errors.Unavailable:
                self._undo_resume(user_id, cid, c.dispatch_epoch, before, idem)
                raise
        log.info("campaign=%s %s (dispatch epoch %d)", cid, State(c.state).name, c.dispatch_epoch)
        return c

    def _undo_resume(self, user_id: uuid.UUID, cid: uuid.UUID, epoch: int, before: _Snapshot,
                     idem: Idem | None) -> None:
        with self.db.transaction() as s:
            c = self._campaign(s, user_id, cid, lock=True)
            if c.state != State.RUNNING or c.dispatch_epoch != epoch:
                return
            before.restore(c)
            s.flush()
            self._campaign_changed(s, c, action="campaign.resume_reverted", event=outbox.CAMPAIGN_REVERTED,
                                   description="Resume reverted: the dispatcher was unavailable.",
                                   extra={"epoch": epoch})
            if idem is not None and idem.request_id:
                idempotency.forget(s, user_id, idem.request_id)
        log.warning("campaign=%s resume reverted: dispatcher unavailable", cid)

    def cancel_campaign(self, user_id: uuid.UUID, campaign_id: str, idem: Idem | None = None
                        ) -> Campaign | Replayed:
        """The seed's Cancel: CancelDispatch (the job-cancel RPC), PENDING/SENDING/FAILED -> FAILED with
        "cancelled by user" in one statement (a big campaign's PENDING ones by the sweep right after,
        sweeps.py), release of the unsent messages' credits (one RELEASE ledger entry), completed_at,
        CANCELLED. The messages are failed while the dispatcher stops; its confirmation is awaited
        before the credits move."""
        cid = parse_uuid(campaign_id, "campaign_id")
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            c = self._campaign(s, user_id, cid, lock=True)
            lifecycle.check(Op.CANCEL, c.state)
            previous = State(c.state)
            c.dispatch_epoch += 1
            revoked = aborted = 0
            stopped = self.dispatcher.begin_cancel(str(cid), c.dispatch_epoch) if c.started_at is not None else None
            s.flush()
            failed = messages_repo.fail_open(s, cid, CANCEL_REASON, self.settings.cancel_inline_rows)
            if stopped is not None:
                # Confirmed before anything else (UNAVAILABLE rolls everything back), and before the
                # users row is locked: every report of the user's other campaigns needs it.
                outcome = stopped()
                revoked, aborted = outcome.revoked_jobs, outcome.aborted_jobs
                log.info("dispatch jobs revoked for campaign %s (revoked=%d, aborted=%d)", cid, revoked, aborted)
            credits_repo.release(s, user_id, cid, failed.were_open,
                                 f"campaign '{c.name}' cancelled: {failed.were_open} message(s) not sent")
            credits_repo.fold(s, user_id, cid)
            c.failed_count += failed.were_open
            c.pending_count = 0
            c.state = int(State.CANCELLED)
            c.state_reason = CANCEL_REASON
            c.completed_at = utcnow()
            campaigns_repo.touch(s, c)
            self._campaign_changed(s, c, action="campaign.cancel", event=outbox.CAMPAIGN_CANCELLED,
                                   description=f"Campaign '{c.name}' cancelled.",
                                   extra={"campaign_name": c.name, "status": previous.name,
                                          "total_contacts": c.total_contacts, "failed_messages": failed.failed,
                                          "failed_count": c.failed_count, "refunded_credits": failed.were_open,
                                          "revoked_jobs": revoked, "aborted_jobs": aborted})
            self._remember(s, user_id, idem, c)
        log.info("campaign=%s CANCELLED (%d messages failed, %d of them by the sweep after, %d credits refunded)",
                 cid, failed.failed, failed.deferred, failed.were_open)
        return c

    def start_scheduled(self, campaign_id: uuid.UUID) -> Campaign | None:
        """For the scheduler: start a SCHEDULED campaign on behalf of its owner (None if it is gone or no
        longer SCHEDULED). Raises like start_campaign otherwise."""
        with self.db.session() as s:
            c = campaigns_repo.get_any(s, campaign_id)
        if c is None or c.state != State.SCHEDULED:
            return None
        with auth.acting_as(audit.SCHEDULER):
            out = self.start_campaign(c.user_id, str(campaign_id))
        return out if isinstance(out, Campaign) else None


def _insufficient(need: int, have: int) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "INSUFFICIENT_CREDITS", f"starting needs {need} credits, the account has {have} available",
        {"required": str(need), "available": str(have)})


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
