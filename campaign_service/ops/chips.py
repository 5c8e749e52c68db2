"""Chips (WhatsApp numbers behind a WAHA session) of a user."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Collection
from typing import Any

from sqlalchemy import func

from campaign_service import audit, convert, errors, limits, pacing, pagination, phones, warmup
from campaign_service.db.models import Chip
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import MAX_NAME, UPDATABLE_CHIP_PATHS, ChipInput, Idem, Page, Replayed
from campaign_service.repository import chips as chips_repo
from campaign_service.secrets_box import SecretBox
from campaign_service.urlguard import host_allowed

log = logging.getLogger("campaign_service.campaigns")

REGISTER_FIELDS = UPDATABLE_CHIP_PATHS  # every field but the phone, checked alike by Register and Update
# What a running lane was built with (dispatch.lane_for): UpdateChip changes them only without one.
LANE_FIELDS = frozenset({"pacing", "warmup", "waha_api_key", "waha_base_url", "waha_session"})


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
        v += self._violations(spec, REGISTER_FIELDS)
        if v:
            raise errors.InvalidArgument(v)
        url = spec.waha_base_url.strip().rstrip("/")
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

    def _violations(self, spec: ChipInput, fields: Collection[str]) -> list[tuple[str, str]]:
        """Field violations of the chip's `fields` (every field but the phone: see register_chip)."""
        v: list[tuple[str, str]] = []
        url = spec.waha_base_url.strip().rstrip("/")
        if "waha_base_url" not in fields:
            pass
        elif not url:
            v.append(("chip.waha_base_url", "required"))
        elif not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            v.append(("chip.waha_base_url", "must be an http(s) URL, e.g. http://127.0.0.1:3000"))
        elif not host_allowed(url, self.settings.waha_hosts):
            v.append(("chip.waha_base_url", "not one of the WAHA servers this service may call (the operator's "
                                            "WHAGO_WAHA_HOSTS)"))
        if "waha_session" not in fields:
            pass
        elif not spec.waha_session.strip():
            v.append(("chip.waha_session", "required"))
        elif not re.fullmatch(r"[\w.\-]{1,100}", spec.waha_session.strip()):
            v.append(("chip.waha_session", "letters, digits, '_', '-' and '.' only"))
        if "display_name" in fields and len(spec.display_name) > MAX_NAME:
            v.append(("chip.display_name", f"at most {MAX_NAME} characters"))
        if "proxy_label" in fields and len(spec.proxy_label) > MAX_NAME:
            v.append(("chip.proxy_label", f"at most {MAX_NAME} characters"))
        if "waha_api_key" in fields and any(ord(c) < 32 or ord(c) == 127 for c in spec.waha_api_key):
            v.append(("chip.waha_api_key", "no control characters (it is sent as an HTTP header)"))
        if "pacing" in fields:
            v.extend(pacing.validate_pacing(spec.pacing, "chip.pacing"))
        if "warmup" in fields and spec.warmup is not None:
            v.extend(warmup.validate(spec.warmup, "chip.warmup"))
        return v

    def update_chip(self, user_id: uuid.UUID, chip_id: str, spec: ChipInput, paths: list[str],
                    idem: Idem | None = None) -> Chip | Replayed:
        """Write the chip's `paths`; what the lanes use only while no RUNNING campaign sends through
        it (their lanes were built from the chip at Start/Resume: Pause, update, Resume)."""
        chid = parse_uuid(chip_id, "chip.id")
        v = self._violations(spec, paths)
        if v:
            raise errors.InvalidArgument(v)
        url, session_name = spec.waha_base_url.strip().rstrip("/"), spec.waha_session.strip()
        with self.db.transaction() as s:
            if (r := self._replay(s, user_id, idem)) is not None:
                return r
            chip = chips_repo.get(s, user_id, chid, lock=True)
            if chip is None:
                raise errors.NotFound("chip", str(chid))
            live = [p for p in paths if p in LANE_FIELDS]
            if live and (busy := chips_repo.in_use(s, user_id, chid, running_only=True)):
                raise errors.FailedPrecondition(
                    "CHIP_IN_USE", f"{', '.join(live)} cannot change while {len(busy)} running campaign(s) send "
                    "through the chip: pause them, update, then resume (Resume applies the change)",
                    {"campaign_ids": ",".join(str(b) for b in busy), "fields": ",".join(live)})
            if {"waha_base_url", "waha_session"} & set(paths):
                url = url if "waha_base_url" in paths else chip.waha_base_url
                session_name = session_name if "waha_session" in paths else chip.waha_session
                dup = chips_repo.same_number(s, user_id, "", url, session_name, exclude=chid)
                if dup is not None:
                    raise errors.AlreadyExists(
                        "CHIP_ALREADY_REGISTERED", f"chip {dup[0].id} already uses this WAHA server and session",
                        {"field": "chip.waha_session", "chip_id": str(dup[0].id)})
            for p in paths:
                if p == "display_name":
                    chip.display_name = spec.display_name.strip()
                elif p == "proxy_label":
                    chip.proxy_label = spec.proxy_label.strip()
                elif p == "waha_base_url":
                    chip.waha_base_url = url
                elif p == "waha_session":
                    chip.waha_session = session_name
                elif p == "waha_api_key":
                    chip.waha_api_key = SecretBox(self.settings.secret_keys).seal(spec.waha_api_key)
                elif p == "pacing":
                    chip.pacing = convert.to_json(spec.pacing)
            if "warmup" in paths:
                plan = warmup.resolve(spec.warmup, convert.pacing_from_json(chip.pacing), True)
                chip.warmup = None if plan is None else convert.to_json(plan)
            chip.updated_at = func.now()
            s.flush()
            s.refresh(chip)
            audit.record(s, user_id=user_id, action="chip.update", entity_type="chip", entity_id=str(chid),
                         description=f"Chip {chip.phone} updated: {', '.join(paths)}.",
                         extra_data={"paths": paths})
            self._remember(s, user_id, idem, chip)
        log.info("chip=%s updated (%s)", chid, ", ".join(paths))
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
