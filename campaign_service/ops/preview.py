"""PreviewMessages: a campaign's messages rendered exactly as they will be sent (template chosen by
weight, spintax alternatives and variables, all deterministic per contact), without sending."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from campaign_service import errors, phones, templates
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.repository import contacts as contacts_repo

DEFAULT_COUNT = 10
MAX_COUNT = 100


@dataclass(frozen=True)
class PreviewContact:
    phone: str
    name: str
    variables: Mapping[str, str]


@dataclass(frozen=True)
class Preview:
    contact_id: str
    phone: str
    template_index: int
    variant: str
    text: str
    media_id: str


@dataclass(frozen=True)
class PreviewResult:
    previews: list[Preview]
    distinct_texts: int
    variant_count: int


class PreviewOps(OpsBase):
    def preview(self, user_id: uuid.UUID, campaign_id: str, count: int, contacts: Sequence[PreviewContact],
                default_region: str) -> PreviewResult:
        cid = parse_uuid(campaign_id, "campaign_id")
        if count < 0 or count > MAX_COUNT:
            raise errors.InvalidArgument([("count", f"between 0 and {MAX_COUNT}")])
        if len(contacts) > MAX_COUNT:
            raise errors.InvalidArgument([("contacts", f"at most {MAX_COUNT}")])
        region = default_region or self.settings.default_region
        people: list[tuple[int, str, str, str, Mapping[str, str]]] = []  # (seed, contact id, phone, name, vars)
        v: list[tuple[str, str]] = []
        for i, pc in enumerate(contacts):
            got = phones.normalize(pc.phone, region)
            if isinstance(got, str):
                v.append((f"contacts[{i}].phone", got))
            else:
                people.append((int(got.digits), "", got.digits, pc.name, pc.variables))
        if v:
            raise errors.InvalidArgument(v)
        with self.db.session() as s:
            c = self._campaign(s, user_id, cid)
            if not contacts:
                for ct in contacts_repo.page(s, cid, count or DEFAULT_COUNT, 0):
                    people.append((ct.id, str(ct.id), ct.phone, ct.name, ct.variables or {}))
        stored = c.templates or []
        if not stored:
            raise errors.FailedPrecondition("NO_TEMPLATES", "the campaign has no templates to preview",
                                            {"campaign_id": str(cid)})
        texts = [templates.template_parts(stored, k) for k in range(len(stored))]
        problems = templates.validate([(t, m is not None) for t, m in texts], "campaign.templates")
        if problems:
            raise errors.InvalidArgument(problems)
        pattern = templates.weight_pattern(templates.weights(stored))
        out = []
        for seed, contact_id, phone, name, variables in people:
            k = templates.pick_template(pattern, seed)
            r = templates.render_message(stored, k, seed, name, phone, variables)
            media = texts[k][1]
            out.append(Preview(contact_id, phone, k, r.variant, r.text, str(media) if media else ""))
        variants = sum(templates.variant_count(templates.parse(t)) for t, _ in texts)
        return PreviewResult(out, len({p.text for p in out}), variants)
