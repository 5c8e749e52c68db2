"""Effective pacing of a lane and validation of Pacing/Camouflage/settings.

A chip's Pacing is its owner's ceiling; unset fields take WAHA's anti-ban defaults (random
30-60 s). A campaign may only tighten it: the larger gaps win (max of the interval bounds),
the smaller caps win (min of non-zero caps), and the sending windows intersect."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta
from functools import lru_cache

from campaign_service import errors
from whago.campaign.v1 import resources_pb2 as res

DEFAULT_INTERVAL_MIN = 30.0
DEFAULT_INTERVAL_MAX = 60.0
MAX_INTERVAL_SECONDS = 7 * 86400.0

Violation = tuple[str, str]


@lru_cache(maxsize=512)
def _valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
        return True
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False


def validate_pacing(p: res.Pacing, prefix: str) -> list[Violation]:
    """Field violations of one Pacing (named `prefix.<field>`)."""
    out: list[Violation] = []
    lo = p.interval_min_seconds if p.HasField("interval_min_seconds") else None
    hi = p.interval_max_seconds if p.HasField("interval_max_seconds") else None
    for name, v in (("interval_min_seconds", lo), ("interval_max_seconds", hi)):
        if v is not None and not (0 <= v <= MAX_INTERVAL_SECONDS):
            out.append((f"{prefix}.{name}", f"must be between 0 and {MAX_INTERVAL_SECONDS:g} seconds"))
    if lo is not None and hi is not None and lo > hi:
        out.append((f"{prefix}.interval_min_seconds",
                    f"interval_min_seconds ({lo:g}) must not exceed interval_max_seconds ({hi:g})"))
    for name, cap in (("max_per_hour", p.max_per_hour), ("max_per_day", p.max_per_day)):
        if cap < 0:
            out.append((f"{prefix}.{name}", "must be >= 0 (0 means no cap)"))
    if p.HasField("window"):
        out.extend(validate_window(p.window, f"{prefix}.window"))
    if p.HasField("warmup"):
        out.append((f"{prefix}.warmup", "set by the service from the chip's plan: use chip.warmup"))
    return out


def with_warmup(p: res.Pacing, plan: res.WarmupPlan | None) -> res.Pacing:
    """A lane's pacing with its chip's warm-up plan (defaults already filled in), when enabled."""
    if plan is not None and plan.enabled:
        p.warmup.CopyFrom(plan)
    return p


def validate_window(w: res.SendingWindow, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    if w.timezone and not _valid_timezone(w.timezone):
        out.append((f"{prefix}.timezone", f"unknown IANA timezone {w.timezone!r}"))
    if not 0 <= w.start_hour <= 23:
        out.append((f"{prefix}.start_hour", "must be between 0 and 23"))
    if not 1 <= w.end_hour <= 24:
        out.append((f"{prefix}.end_hour", "must be between 1 and 24"))
    elif w.end_hour <= w.start_hour:
        out.append((f"{prefix}.end_hour", "must be greater than start_hour"))
    for i, d in enumerate(w.weekdays):
        if not 1 <= d <= 7:
            out.append((f"{prefix}.weekdays[{i}]", "ISO weekday must be between 1 (Monday) and 7 (Sunday)"))
    return out


def validate_camouflage(c: res.Camouflage, prefix: str) -> list[Violation]:
    out: list[Violation] = []
    if c.HasField("typing_chars_per_second") and not c.typing_chars_per_second > 0:
        out.append((f"{prefix}.typing_chars_per_second", "must be > 0"))
    if c.HasField("typing_max_seconds") and not 0 <= c.typing_max_seconds <= 60:
        out.append((f"{prefix}.typing_max_seconds", "must be between 0 and 60"))
    return out


def validate_settings(s: res.CampaignSettings, prefix: str) -> list[Violation]:
    out = validate_pacing(s.pacing, f"{prefix}.pacing")
    out += validate_camouflage(s.camouflage, f"{prefix}.camouflage")
    if s.max_failures < 0:
        out.append((f"{prefix}.max_failures", "must be >= 0 (0 means never auto-pause)"))
    return out


def _cap(a: int, b: int) -> int:
    """Smaller non-zero cap; 0 means no cap."""
    caps = [x for x in (a, b) if x > 0]
    return min(caps) if caps else 0


def _intersect_windows(chip: res.SendingWindow, camp: res.SendingWindow) -> res.SendingWindow | None:
    """The common window, or None when there is no hour left to send in."""
    if chip.timezone != camp.timezone:
        # Hours in different zones do not intersect as plain numbers; the campaign's own window
        # is the stricter wish of the two.
        return camp
    days = set(chip.weekdays or range(1, 8)) & set(camp.weekdays or range(1, 8))
    start, end = max(chip.start_hour, camp.start_hour), min(chip.end_hour, camp.end_hour)
    if not days or end <= start:
        return None
    return res.SendingWindow(timezone=chip.timezone, start_hour=start, end_hour=end,
                             weekdays=sorted(days) if len(days) < 7 else [])


def effective(chip: res.Pacing, campaign: res.Pacing) -> res.Pacing:
    """The chip's pacing (defaults filled in) tightened by the campaign's. Raises FailedPrecondition
    when the two sending windows leave no hour to send in."""
    lo = chip.interval_min_seconds if chip.HasField("interval_min_seconds") else DEFAULT_INTERVAL_MIN
    hi = chip.interval_max_seconds if chip.HasField("interval_max_seconds") else max(DEFAULT_INTERVAL_MAX, lo)
    if campaign.HasField("interval_min_seconds"):
        lo = max(lo, campaign.interval_min_seconds)
    if campaign.HasField("interval_max_seconds"):
        hi = max(hi, campaign.interval_max_seconds)
    hi = max(hi, lo)
    out = res.Pacing(interval_min_seconds=lo, interval_max_seconds=hi,
                     max_per_hour=_cap(chip.max_per_hour, campaign.max_per_hour),
                     max_per_day=_cap(chip.max_per_day, campaign.max_per_day))
    if chip.HasField("window") and campaign.HasField("window"):
        w = _intersect_windows(chip.window, campaign.window)
        if w is None:
            raise errors.FailedPrecondition(
                "NO_SENDING_WINDOW", "the chip's and the campaign's sending windows do not overlap")
        out.window.CopyFrom(w)
    elif chip.HasField("window"):
        out.window.CopyFrom(chip.window)
    elif campaign.HasField("window"):
        out.window.CopyFrom(campaign.window)
    return out


def _in_window(w: res.SendingWindow, local: datetime) -> bool:
    end = w.end_hour or 24
    return (not w.weekdays or local.isoweekday() in w.weekdays) and w.start_hour <= local.hour < end


def window_open_since(w: res.SendingWindow, now: float, horizon_hours: int = 8 * 24) -> float | None:
    """When the sending window's current open period began (unix seconds; at most `horizon_hours`
    back), or None when it is closed at `now`. The watchdog uses it: a lane cannot be expected to
    have leased while its window was closed."""
    try:
        tz = zoneinfo.ZoneInfo(w.timezone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        tz = zoneinfo.ZoneInfo("UTC")
    hour = datetime.fromtimestamp(now, tz).replace(minute=0, second=0, microsecond=0)
    if not _in_window(w, hour):
        return None
    for _ in range(horizon_hours):
        before = hour - timedelta(hours=1)  # wall-clock hours, as the window is written
        if not _in_window(w, before):
            break
        hour = before
    return hour.timestamp()


def effective_camouflage(c: res.Camouflage) -> res.Camouflage:
    """Camouflage with the documented defaults filled in, so the dispatcher gets explicit values."""
    return res.Camouflage(
        send_seen=c.send_seen if c.HasField("send_seen") else True,
        typing=c.typing if c.HasField("typing") else True,
        typing_chars_per_second=c.typing_chars_per_second if c.HasField("typing_chars_per_second") else 12.0,
        typing_max_seconds=c.typing_max_seconds if c.HasField("typing_max_seconds") else 8.0)
