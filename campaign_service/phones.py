"""Phone normalization with libphonenumber: E.164 digits without "+" and WAHA chat ids.

It runs on 100k-1M rows per import, so: results are memoized per (raw, region); clean digit
strings skip `phonenumbers.parse` (the slow, regex-heavy part) and build the PhoneNumber
directly, falling back to the full parser whenever the shortcut could differ from it (a
national/trunk prefix, an invalid result)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, ValidationResult
from phonenumbers.phonemetadata import PhoneMetadata

_FORMATTING = re.compile(r"[\s\-().\u00a0/]")
_CLEAN = re.compile(r"\+?[1-9]\d{5,16}")
_COUNTRY_CODES = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


@dataclass(frozen=True, slots=True)
class Normalized:
    digits: str
    chat_id: str


def chat_id(digits: str) -> str:
    return f"{digits}@c.us"


@lru_cache(maxsize=512)
def _region_info(region: str) -> tuple[int, re.Pattern[str] | None] | None:
    """(country code, national-prefix-for-parsing pattern) of a region, None if unknown."""
    md = PhoneMetadata.metadata_for_region(region.upper())
    if md is None:
        return None
    npp = md.national_prefix_for_parsing
    return int(md.country_code or 0), (re.compile(npp) if npp else None)


_TYPE_DESCS = ("mobile", "fixed_line", "premium_rate", "toll_free", "shared_cost", "voip", "personal_number",
               "pager", "uan", "voicemail")


@lru_cache(maxsize=512)
def _validator(region: str) -> Callable[[str], bool] | None:
    """is_valid_number for a region's national significant numbers, as libphonenumber decides it
    (matches the general description and at least one number type), with precompiled patterns and
    the common types (mobile, fixed line) tried first."""
    md = PhoneMetadata.metadata_for_region(region)
    if md is None:
        return None

    def compiled(desc: Any) -> tuple[frozenset[int], re.Pattern[str]] | None:
        if desc is None or desc.national_number_pattern is None:
            return None
        return frozenset(desc.possible_length or ()), re.compile(desc.national_number_pattern)

    general = compiled(md.general_desc)
    if general is None:
        return None
    types = [d for d in (compiled(getattr(md, name, None)) for name in _TYPE_DESCS) if d is not None]

    g_lengths, g_full = general[0], general[1].fullmatch
    checks = tuple((lengths, pattern.fullmatch) for lengths, pattern in types)

    def valid(nsn: str) -> bool:
        n = len(nsn)
        if (g_lengths and n not in g_lengths) or g_full(nsn) is None:
            return False
        for lengths, full in checks:  # noqa: SIM110 -- a loop: any() over a generator is slower here
            if (not lengths or n in lengths) and full(nsn) is not None:
                return True
        return False

    return valid


_Plan = tuple[tuple[Callable[[str], Any], ...], Callable[[str], bool] | None]


@lru_cache(maxsize=1024)
def _plan(cc: int) -> _Plan | None:
    """For a country code: the national-prefix matchers of its regions, and the validator when it
    has exactly one region (None: ask phonenumbers.is_valid_number); None for an unknown code."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(cc)
    if not regions:
        return None
    prefixes = []
    for region in regions:
        info = _region_info(region)
        if info is not None and info[1] is not None:
            prefixes.append(info[1].match)
    return tuple(prefixes), (_validator(regions[0]) if len(regions) == 1 else None)


def _from_parts(cc: int, national: str) -> Normalized | None:
    """Shortcut result for a country code and national digits, if valid and unambiguous."""
    if national.startswith("0"):
        return None
    plan = _plan(cc)
    if plan is None:
        return None
    prefixes, check = plan
    for prefix in prefixes:
        if prefix(national):
            return None  # the parser might strip a trunk/carrier prefix: let it decide
    if check is not None:
        if not check(national):
            return None
    elif not phonenumbers.is_valid_number(PhoneNumber(country_code=cc, national_number=int(national))):
        return None
    digits = f"{cc}{national}"
    return Normalized(digits, f"{digits}@c.us")


_CC_BY_PREFIX = {str(cc): cc for cc in _COUNTRY_CODES}


def _fast(cleaned: str, info: tuple[int, re.Pattern[str] | None]) -> Normalized | None:
    if cleaned.startswith("+"):
        body = cleaned[1:]
        for n in (1, 2, 3):
            cc = _CC_BY_PREFIX.get(body[:n])
            if cc is not None:
                return _from_parts(cc, body[n:])
        return None
    return _from_parts(info[0], cleaned)


_POSSIBLE_REASONS = {
    ValidationResult.INVALID_COUNTRY_CODE: "invalid country code",
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.INVALID_LENGTH: "invalid length",
}


def _slow(raw: str, region: str) -> Normalized | str:
    try:
        num = phonenumbers.parse(raw, region)
    except NumberParseException as exc:
        return f"not a phone number: {exc._msg}"
    if not phonenumbers.is_valid_number(num):
        why = phonenumbers.is_possible_number_with_reason(num)
        detail = _POSSIBLE_REASONS.get(why, "no such number in its numbering plan")
        return f"invalid number ({detail})"
    digits = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)[1:]
    return Normalized(digits, chat_id(digits))


@lru_cache(maxsize=65_536)
def normalize(raw: str, region: str = "BR") -> Normalized | str:
    """Normalized phone, or the reason (a str) it is rejected. `region` applies to numbers without
    a country code."""
    stripped = raw.strip()
    if not stripped:
        return "empty phone"
    if len(stripped) > 64:
        return "not a phone number: too long"
    info = _region_info(region)
    if info is None:
        return f"unknown default region {region!r}"
    cleaned = _FORMATTING.sub("", stripped)
    if _CLEAN.fullmatch(cleaned):
        fast = _fast(cleaned, info)
        if fast is not None:
            return fast
    return _slow(stripped, region)


def valid_region(region: str) -> bool:
    return _region_info(region) is not None


_LOOSE = re.compile(r"\+?\d{8,15}")


def chip_phone(raw: str, region: str = "BR") -> str | None:
    """E.164 digits of a chip's own number. Chips are the user's declared numbers: a well-formed
    E.164-length digit string is accepted even when libphonenumber does not know its range."""
    got = normalize(raw, region)
    if isinstance(got, Normalized):
        return got.digits
    cleaned = _FORMATTING.sub("", raw.strip())
    if _LOOSE.fullmatch(cleaned) and not cleaned.lstrip("+").startswith("0"):
        return cleaned.lstrip("+")
    return None
