"""What the CLI prints: human tables by default, JSON (`--json`) for scripts."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import resources_pb2 as res

#: Rows buffered to size table columns before streaming the rest with the same widths.
_TABLE_SAMPLE = 200


# --------------------------------------------------------------------------- formatting


def stdout() -> TextIO:
    return sys.stdout


def to_dict(msg: Message) -> dict[str, object]:
    """JSON with proto field names and zero values shown, so counters of 0 are not missing."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(msg: Message) -> None:
    print(json.dumps(to_dict(msg), indent=2, ensure_ascii=False), file=stdout())


def print_json_list(items: Iterable[Message]) -> None:
    """A JSON array written item by item, so a huge listing is never held in memory."""
    out = stdout()
    out.write("[")
    empty = True
    for item in items:
        out.write("\n  " if empty else ",\n  ")
        out.write(json.dumps(to_dict(item), ensure_ascii=False))
        empty = False
    out.write("]\n" if empty else "\n]\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Column-aligned table; widths come from the first rows, the rest stream through."""
    out = stdout()
    it = iter(rows)
    sample = [[cell(v) for v in r] for r in itertools.islice(it, _TABLE_SAMPLE)]
    widths = [max([len(h)] + [len(r[i]) for r in sample]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    print(line(headers), file=out)
    for r in sample:
        print(line(r), file=out)
    for raw in it:
        print(line([cell(v) for v in raw]), file=out)


def cell(value: object) -> str:
    return str(value).replace("\n", " ")


def state_name(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]


def campaign_state_name(value: int) -> str:
    return state_name(res.CampaignState, value, "CAMPAIGN_STATE_")


def message_state_name(value: int) -> str:
    return state_name(res.MessageState, value, "MESSAGE_STATE_")


def chip_state_name(value: int) -> str:
    return state_name(res.ChipState, value, "CHIP_STATE_")


def credit_kind_name(value: int) -> str:
    return state_name(crs.CreditTransactionKind, value, "CREDIT_TRANSACTION_KIND_")


def when(msg: Message, field: str) -> str:
    if not msg.HasField(field):
        return ""
    ts = getattr(msg, field)
    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ"))


def print_campaign(c: res.Campaign) -> None:
    state = campaign_state_name(c.state) + (f" ({c.state_reason})" if c.state_reason else "")
    lines: list[tuple[str, str]] = [
        ("id", c.id),
        ("name", c.name),
        ("description", c.description),
        ("state", state),
        ("contacts", str(c.total_contacts)),
        (
            "messages",
            f"pending={c.pending_count} sent={c.sent_count} delivered={c.delivered_count} "
            f"read={c.read_count} failed={c.failed_count} skipped={c.skipped_count}",
        ),
        ("chips", ", ".join(c.chip_ids) or "(all of the owner's chips)"),
    ]
    for i, t in enumerate(c.templates, 1):
        lines.append((f"template {i}", t.text + (f" [media {t.media_id}]" if t.media_id else "")))
    pacing = c.settings.pacing
    if pacing.HasField("interval_min_seconds") or pacing.HasField("interval_max_seconds"):
        lines.append(("interval", f"{pacing.interval_min_seconds:g}-{pacing.interval_max_seconds:g}s"))
    lines += [
        ("scheduled", when(c, "schedule_time")),
        ("created", when(c, "create_time")),
        ("started", when(c, "start_time")),
        ("completed", when(c, "complete_time")),
        ("etag", c.etag),
    ]
    out = stdout()
    for key, value in lines:
        if value:
            print(f"{key + ':':<13}{value}", file=out)


def print_chip(ch: res.Chip) -> None:
    state = chip_state_name(ch.state) + (f" ({ch.state_reason})" if ch.state_reason else "")
    out = stdout()
    for key, value in (
        ("id", ch.id),
        ("name", ch.display_name),
        ("phone", ch.phone),
        ("waha", f"{ch.waha_base_url} session={ch.waha_session}"),
        ("proxy", ch.proxy_label),
        ("state", state),
        ("created", when(ch, "create_time")),
    ):
        if value:
            print(f"{key + ':':<13}{value}", file=out)


def progress_line_from(state: str, counts: dict[str, int]) -> str:
    """One line of progress from a state name and the counters of a snapshot or event."""
    total, pending = counts.get("total_contacts", 0), counts.get("pending_count", 0)
    done = total - pending if state != "DRAFT" else 0
    pct = f" {100 * done / total:.0f}%" if total else ""
    now = datetime.now().strftime("%H:%M:%S")
    return (f"{now} {state:<9} pending={pending} sent={counts.get('sent_count', 0)} "
            f"failed={counts.get('failed_count', 0)} skipped={counts.get('skipped_count', 0)} ({done}/{total}{pct})")


class ProgressBar:
    """A live terminal bar (rich): sent / failed / pending, rate and ETA, for `campaigns watch`."""

    def __init__(self, out: TextIO) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.fields[state]:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("sent {task.fields[sent]}  failed {task.fields[failed]}  pending {task.fields[pending]}"),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=Console(file=out), transient=False)
        self._task = self._progress.add_task("campaign", total=None, state="", sent=0, failed=0, pending=0, rate="")
        self._progress.start()

    def update(self, state: str, counts: dict[str, int]) -> None:
        total = counts.get("total_contacts") or None
        pending = counts.get("pending_count", 0)
        done = (total or 0) - pending if total else 0
        task = self._progress.tasks[0]
        rate = f"{task.speed:.1f} msg/s" if task.speed else ""
        self._progress.update(self._task, total=total, completed=done, state=state,
                              sent=counts.get("sent_count", 0), failed=counts.get("failed_count", 0),
                              pending=pending, rate=rate)

    def close(self) -> None:
        self._progress.stop()


T = TypeVar("T")


def count_data_lines(path: str | Path) -> int:
    """Lines after the header, counted in binary chunks (a million-row file in tens of ms): the
    import bar's total. Approximate for blank lines or quoted newlines; the bar ends at the real count."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(0, lines - 1)


class ImportProgress:
    """A live terminal bar (rich) for `campaigns import`: rows sent of the file's rows, rate, ETA.

    `rows()` wraps the CSV rows the SDK streams; gRPC reads them on its own thread, and rich's
    Progress is thread-safe, so the bar moves as batches go out."""

    STEP = 500  # rows between updates: a redraw per row would cost more than the import

    def __init__(self, out: TextIO, total: int | None) -> None:
        self._progress = Progress(
            TextColumn("[bold]import"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=Console(file=out), transient=False)
        self._task = self._progress.add_task("import", total=total, rate="")
        self.sent = 0
        self._progress.start()

    def rows(self, rows: Iterable[T]) -> Iterator[T]:
        pending = 0
        for row in rows:
            yield row
            pending += 1
            if pending == self.STEP:
                self._advance(pending)
                pending = 0
        self._advance(pending)

    def _advance(self, n: int) -> None:
        self.sent += n
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, advance=n, rate=f"{speed:,.0f} rows/s" if speed else "")

    def close(self) -> None:
        self._progress.update(self._task, total=self.sent, completed=self.sent)  # the real count
        self._progress.stop()
