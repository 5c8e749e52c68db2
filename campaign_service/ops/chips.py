"""Chips (WhatsApp numbers behind a WAHA session) of a user."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from campaign_service import audit, convert, errors, limits, pacing, pagination, phones, warmup
from campaign_service.db.models import Chip
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import MAX_NAME, ChipInput, Idem, Page, Replayed
from campaign_service.repository import chips as chips_repo
from campaign_service.secrets_box import SecretBox
from campaign_service.urlguard import host_allowed

log = logging.getLogger("campaign_service.campaigns")


class ChipOps(OpsBase):
    """Register/Get/List/DeleteChip."""

    @property
    def _warmup_state(self) -> warmup.StateReader:
        """Reader of the dispatcher's warm-up counts (GetChip/ListChips show today's cap)."""
        r: warmup.StateReader | None = self.__dict__.get("_warmup_reader")
        if r is None:
            r = self.__dict__.setdefault("_warmup_reader", warmup.StateReader(self.settings.redis_url))
        return r

    def warmup_today(self, chips: list[Chip]) -> dict[str, warmup.Today]:
        """Today's warm-up day and effective daily cap of each chip (chip id -> view)."""
        return self._warmup_state.views([(str(c.id), convert.warmup_from_json(c.warmup),
                                          convert.pacing_from_json(c.pacing)) for c in chips])

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
        elif not host_allowed(url, self.settings.waha_hosts):
            v.append(("chip.waha_base_url", "not one of the WAHA servers this service may call (the operator's "
                                            "WHAGO_WAHA_HOSTS)"))
        if not spec.waha_session.strip():
            v.append(("chip.waha_session", "required"))
        elif not re.fullmatch(r"[\w.\-]{1,100}", spec.waha_session.strip()):
            v.append(("chip.waha_session", "letters, digits, '_', '-' and '.' only"))
        if len(spec.display_name) > MAX_NAME:
            v.append(("chip.display_name", f"at most {MAX_NAME} characters"))
        if any(ord(c) < 32 or ord(c) == 127 for c in spec.waha_api_key):
            v.append(("chip.waha_api_key", "no control characters (it is sent as an HTTP header)"))
        v.extend(pacing.validate_pacing(spec.pacing, "chip.pacing"))
        if spec.warmup is not None:
            v.extend(warmup.validate(spec.warmup, "chip.warmup"))
        if v:
            raise errors.InvalidArgument(v)
        assert phone is not None
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            dup = chips_repo.same_number(s, user_id, phone, url, spec.waha_session.strip())
            limits.check("chips", chips_repo.count(s, user_id), 1, limits.for_user(s, self.settings, user_id).chips)
            if dup is not None:
                # Pacing is per chip: two chips for one number would send at twice its pace.
                raise errors.AlreadyExists(
                    "CHIP_ALREADY_REGISTERED", f"this WhatsApp number is already registered as chip {dup[0].id} "
                    f"({'same phone' if dup[1] == 'chip.phone' else 'same WAHA server and session'})",
                    {"field": dup[1], "chip_id": str(dup[0].id)})
            chip = chips_repo.insert(s, user_id=user_id, display_name=spec.display_name.strip(), phone=phone,
                                     waha_base_url=url, waha_session=spec.waha_session.strip(),
                                     waha_api_key=SecretBox(self.settings.secret_keys).seal(spec.waha_api_key),
                                     proxy_label=spec.proxy_label.strip(),
                                     pacing=convert.to_json(spec.pacing),
                                     warmup=self._plan_json(spec))
            audit.record(s, user_id=user_id, action="chip.register", entity_type="chip", entity_id=str(chip.id),
                         description=f"Chip {chip.phone} registered.",
                         extra_data={"phone": chip.phone, "waha_session": chip.waha_session,
                                     "display_name": chip.display_name})
            self._remember(s, user_id, idem, chip)
        log.info("chip=%s registered (phone %s, session %s)", chip.id, chip.phone, chip.waha_session)
        return chip

    def _plan_json(self, spec: ChipInput) -> dict[str, Any] | None:
        plan = warmup.resolve(spec.warmup, spec.pacing, self.settings.warmup_default)
        return None if plan is None else convert.to_json(plan)

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
