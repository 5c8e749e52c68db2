"""Contacts and messages of a campaign: the streamed import and the paged reads."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from campaign_service import errors, lifecycle, limits, outbox, pagination, phones, templates
from campaign_service.db.models import Contact
from campaign_service.ids import parse_uuid
from campaign_service.lifecycle import Op
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import (
    COPY_BATCH,
    MAX_CONTACT_NAME,
    MAX_REJECTED_REPORTED,
    ImportChunk,
    ImportResult,
    Page,
    Rejected,
)
from campaign_service.repository import campaigns as campaigns_repo
from campaign_service.repository import contacts as contacts_repo
from campaign_service.repository import messages as messages_repo
from campaign_service.repository.messages import MessageRow
from campaign_service.states import MessageState

log = logging.getLogger("campaign_service.campaigns")


class ContactOps(OpsBase):
    """ImportContacts, ListContacts, ListCampaignMessages."""

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
            columns: set[str] = set()
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
                                if r.variables:
                                    columns.update(k.replace("\x00", "") for k in r.variables)
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
            limits.check("contacts_per_campaign", c.total_contacts, inserted,
                         limits.for_user(s, self.settings, user_id).contacts_per_campaign)
            c.total_contacts += inserted
            if columns - set(c.variable_names):
                c.variable_names = sorted(set(c.variable_names) | columns)
            out.total_contacts = c.total_contacts
            campaigns_repo.touch(s, c)
            self._campaign_changed(s, c, action="campaign.import_contacts", event=outbox.CAMPAIGN_UPDATED,
                                   description=f"{inserted} contacts imported into '{c.name}'.",
                                   extra={"campaign_name": c.name, "fields": ["contacts"], "imported": inserted,
                                          "duplicates": out.duplicates, "rejected": out.rejected_count,
                                          "total_contacts": c.total_contacts})
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
            c = self._campaign(s, user_id, cid)
            if c.state in lifecycle.EDITABLE:
                # Not started: it has no messages. Rows found are an interrupted Start's leftovers
                # (cleared by the next Start or Delete).
                return Page([], "")
            rows: list[MessageRow] = messages_repo.page(s, cid, state, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("messages", f"{cid}/{state}", [rows[-1].id])
        # The variant is not stored: rendering is deterministic per contact, so it is recomputed.
        rows = [replace(r, variant=templates.render_message(c.templates, r.template_index, r.contact_id, r.name,
                                                            r.phone, r.variables).variant) for r in rows]
        return Page(rows, token)

    @staticmethod
    def _int_cursor(cursor: list[Any] | None) -> int:
        if cursor is None:
            return 0
        if len(cursor) != 1 or not isinstance(cursor[0], int):
            raise errors.InvalidArgument([("page_token", "malformed page token")])
        return cursor[0]
