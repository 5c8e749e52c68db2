"""Inputs, results and limits of the domain operations (what the servicers build from protobuf
and get back), and the update-mask rule of UpdateCampaign."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from google.protobuf import field_mask_pb2

from campaign_service import errors
from whago.campaign.v1 import resources_pb2 as res

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
    warmup: res.WarmupPlan | None = None  # None: the default plan (warmup.py)


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
    deleted_media_files: int = 0  # files removed: content no other campaign of the user still uses


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_page_token: str


UPDATABLE_CHIP_PATHS = ("display_name", "proxy_label", "pacing", "warmup", "waha_api_key", "waha_base_url",
                        "waha_session")


def chip_mask_paths(mask: field_mask_pb2.FieldMask | None, chip: res.Chip) -> list[str]:
    """UpdateChip's paths: the mask's, or (AIP-134) every updatable field set in `chip`."""
    present = {p: (chip.HasField(p) if p in ("pacing", "warmup") else bool(getattr(chip, p)))  # type: ignore[arg-type]
               for p in UPDATABLE_CHIP_PATHS}
    return _mask_paths(mask, present, lambda p: False,
                       {"phone": "phone is immutable: a new number is a new chip"}, "")


def mask_paths(mask: field_mask_pb2.FieldMask | None, patch: CampaignInput, *, settings_set: bool) -> list[str]:
    """UpdateCampaign's paths: the mask's (settings.* sub-paths too), or (AIP-134) every populated
    updatable field when it is empty."""
    present = {"name": bool(patch.name), "description": bool(patch.description), "templates": bool(patch.templates),
               "settings": settings_set, "chip_ids": bool(patch.chip_ids),
               "schedule_time": patch.schedule_time is not None}
    return _mask_paths(mask, present, lambda p: p.startswith("settings.") and _settings_subpath_ok(p[9:]), {},
                       " and settings.*")


def _mask_paths(mask: field_mask_pb2.FieldMask | None, present: dict[str, bool], sub_ok: Callable[[str], bool],
                refused: dict[str, str], more: str) -> list[str]:
    """The update paths of an AIP-134 mask over the updatable fields (`present`'s keys, in order):
    "*" for all, a path `sub_ok` accepts, or INVALID_ARGUMENT on update_mask naming the problem."""
    if mask is None or not mask.paths:
        paths = [p for p, on in present.items() if on]
        if not paths:
            raise errors.InvalidArgument([("update_mask", "no field to update")])
        return paths
    out: list[str] = []
    for p in mask.paths:
        if p == "*":
            out.extend(present)
        elif p in present or sub_ok(p):
            out.append(p)
        else:
            why = refused.get(p) or f"unknown or read-only path {p[:100]!r}; updatable: {', '.join(present)}{more}"
            raise errors.InvalidArgument([("update_mask", why)])
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
