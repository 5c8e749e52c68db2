"""Operator CLI: `python -m whago_client campaigns list`, `... campaigns watch ID`, etc.

Human-readable tables by default, `--json` for scripts. Failures print
`error: <CODE>: <message>` (plus one `  field: description` line per field violation) on
stderr and exit 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TextIO, TypeAlias

from google.protobuf import json_format
from google.protobuf.message import Message

from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res
from whago_client.client import (
    DEFAULT_TARGET,
    FINAL_CAMPAIGN_STATES,
    WhagoClient,
    campaign_state,
    message_state,
    read_contacts_csv,
)
from whago_client.errors import WhagoError

__all__ = ["build_parser", "main"]

Handler = Callable[[WhagoClient, argparse.Namespace], int]

#: Rows buffered to size table columns before streaming the rest with the same widths.
_TABLE_SAMPLE = 200


# --------------------------------------------------------------------------- formatting


def _out() -> TextIO:
    return sys.stdout


def _to_dict(msg: Message) -> dict[str, object]:
    """JSON with proto field names and zero values shown, so counters of 0 are not missing."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_json(msg: Message) -> None:
    print(json.dumps(_to_dict(msg), indent=2, ensure_ascii=False), file=_out())


def _print_json_list(items: Iterable[Message]) -> None:
    """A JSON array written item by item, so a huge listing is never held in memory."""
    out = _out()
    out.write("[")
    empty = True
    for item in items:
        out.write("\n  " if empty else ",\n  ")
        out.write(json.dumps(_to_dict(item), ensure_ascii=False))
        empty = False
    out.write("]\n" if empty else "\n]\n")


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Column-aligned table; widths come from the first rows, the rest stream through."""
    out = _out()
    it = iter(rows)
    sample = [[_cell(v) for v in r] for r in itertools.islice(it, _TABLE_SAMPLE)]
    widths = [max([len(h)] + [len(r[i]) for r in sample]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    print(line(headers), file=out)
    for r in sample:
        print(line(r), file=out)
    for raw in it:
        print(line([_cell(v) for v in raw]), file=out)


def _cell(value: object) -> str:
    return str(value).replace("\n", " ")


def _state_name(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]


def _campaign_state_name(value: int) -> str:
    return _state_name(res.CampaignState, value, "CAMPAIGN_STATE_")


def _message_state_name(value: int) -> str:
    return _state_name(res.MessageState, value, "MESSAGE_STATE_")


def _chip_state_name(value: int) -> str:
    return _state_name(res.ChipState, value, "CHIP_STATE_")


def _when(msg: Message, field: str) -> str:
    if not msg.HasField(field):
        return ""
    ts = getattr(msg, field)
    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ"))


def _print_campaign(c: res.Campaign) -> None:
    state = _campaign_state_name(c.state) + (f" ({c.state_reason})" if c.state_reason else "")
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
        ("scheduled", _when(c, "schedule_time")),
        ("created", _when(c, "create_time")),
        ("started", _when(c, "start_time")),
        ("completed", _when(c, "complete_time")),
        ("etag", c.etag),
    ]
    out = _out()
    for key, value in lines:
        if value:
            print(f"{key + ':':<13}{value}", file=out)


def _print_chip(ch: res.Chip) -> None:
    state = _chip_state_name(ch.state) + (f" ({ch.state_reason})" if ch.state_reason else "")
    out = _out()
    for key, value in (
        ("id", ch.id),
        ("name", ch.display_name),
        ("phone", ch.phone),
        ("waha", f"{ch.waha_base_url} session={ch.waha_session}"),
        ("proxy", ch.proxy_label),
        ("state", state),
        ("created", _when(ch, "create_time")),
    ):
        if value:
            print(f"{key + ':':<13}{value}", file=out)


def _progress_line(c: res.Campaign) -> str:
    done = c.total_contacts - c.pending_count if c.state != res.CAMPAIGN_STATE_DRAFT else 0
    pct = f" {100 * done / c.total_contacts:.0f}%" if c.total_contacts else ""
    now = datetime.now().strftime("%H:%M:%S")
    return (
        f"{now} {_campaign_state_name(c.state):<9} pending={c.pending_count} sent={c.sent_count} "
        f"delivered={c.delivered_count} read={c.read_count} failed={c.failed_count} "
        f"skipped={c.skipped_count} ({done}/{c.total_contacts}{pct})"
    )


# --------------------------------------------------------------------------- settings from flags


def _pacing(args: argparse.Namespace) -> res.Pacing | None:
    pacing = res.Pacing()
    if args.interval_min is not None:
        pacing.interval_min_seconds = args.interval_min
    if args.interval_max is not None:
        pacing.interval_max_seconds = args.interval_max
    if args.max_per_hour is not None:
        pacing.max_per_hour = args.max_per_hour
    if args.max_per_day is not None:
        pacing.max_per_day = args.max_per_day
    return pacing if pacing.ListFields() else None


def _schedule(value: str | None) -> datetime | None:
    if value is None:
        return None
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"--schedule {value!r} needs a UTC offset, e.g. 2030-01-31T09:00:00-03:00")
    return when


# --------------------------------------------------------------------------- commands


def _limit(items: Iterable[Message], limit: int | None) -> Iterator[Message]:
    return itertools.islice(items, limit) if limit is not None else iter(items)


def cmd_campaigns_list(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_campaigns(state=args.state, page_size=args.page_size)
    items: Iterable[res.Campaign] = itertools.islice(pager, args.limit) if args.limit else pager
    if args.json:
        _print_json_list(items)
        return 0
    _print_table(
        ["ID", "NAME", "STATE", "CONTACTS", "PENDING", "SENT", "FAILED", "CREATED"],
        (
            [c.id, c.name, _campaign_state_name(c.state), c.total_contacts, c.pending_count,
             c.sent_count, c.failed_count, _when(c, "create_time")]
            for c in items
        ),
    )
    return 0


def _show_campaign(c: res.Campaign, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(c)
    else:
        _print_campaign(c)
    return 0


def cmd_campaigns_get(client: WhagoClient, args: argparse.Namespace) -> int:
    return _show_campaign(client.get_campaign(args.id), args)


def cmd_campaigns_create(client: WhagoClient, args: argparse.Namespace) -> int:
    settings = res.CampaignSettings(shuffle_contacts=args.shuffle, max_failures=args.max_failures)
    pacing = _pacing(args)
    if pacing is not None:
        settings.pacing.CopyFrom(pacing)
    campaign = client.create_campaign(
        args.name,
        description=args.description,
        templates=[res.MessageTemplate(text=t, media_id=args.media or "") for t in args.text],
        chip_ids=args.chip,
        settings=settings,
        schedule_time=_schedule(args.schedule),
        request_id=args.request_id,
    )
    return _show_campaign(campaign, args)


def _lifecycle(method_name: str) -> Handler:
    def run(client: WhagoClient, args: argparse.Namespace) -> int:
        method: Callable[[str], res.Campaign] = getattr(client, method_name)
        return _show_campaign(method(args.id), args)

    return run


def cmd_campaigns_delete(client: WhagoClient, args: argparse.Namespace) -> int:
    resp = client.delete_campaign(args.id, etag=args.etag)
    if args.json:
        _print_json(resp)
    else:
        print(
            f"deleted campaign {resp.campaign_id or args.id}: {resp.deleted_contacts} contacts, "
            f"{resp.deleted_messages} messages, {resp.deleted_media} media, "
            f"{resp.revoked_jobs} jobs revoked",
            file=_out(),
        )
    return 0


def cmd_campaigns_import(client: WhagoClient, args: argparse.Namespace) -> int:
    rows = read_contacts_csv(args.file)  # header checked now, rows streamed by the call
    resp: cs.ImportContactsResponse = client.import_contacts(
        args.id, rows, batch_size=args.batch_size, default_region=args.region
    )
    if args.json:
        _print_json(resp)
        return 0
    print(
        f"imported={resp.imported_count} duplicates={resp.duplicate_count} "
        f"rejected={resp.rejected_count} total_contacts={resp.total_contacts}",
        file=_out(),
    )
    if resp.rejected:
        _print_table(["ROW", "PHONE", "REASON"], ([r.row, r.phone, r.reason] for r in resp.rejected))
        if resp.rejected_count > len(resp.rejected):
            print(f"... and {resp.rejected_count - len(resp.rejected)} more rejected rows", file=_out())
    return 0


def cmd_campaigns_contacts(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_contacts(args.id, page_size=args.page_size)
    items: Iterable[res.Contact] = itertools.islice(pager, args.limit) if args.limit else pager
    if args.json:
        _print_json_list(items)
        return 0
    _print_table(
        ["ID", "PHONE", "NAME", "VARIABLES"],
        (
            [c.id, c.phone, c.name, " ".join(f"{k}={v}" for k, v in sorted(c.variables.items()))]
            for c in items
        ),
    )
    return 0


def cmd_campaigns_messages(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_messages(args.id, state=args.state, page_size=args.page_size)
    items: Iterable[res.CampaignMessage] = itertools.islice(pager, args.limit) if args.limit else pager
    if args.json:
        _print_json_list(items)
        return 0
    _print_table(
        ["ID", "PHONE", "CHIP", "STATE", "ATTEMPTS", "SENT", "REASON"],
        (
            [m.id, m.phone, m.chip_id, _message_state_name(m.state), m.attempts,
             _when(m, "sent_time"), m.failure_reason]
            for m in items
        ),
    )
    return 0


def cmd_campaigns_watch(client: WhagoClient, args: argparse.Namespace) -> int:
    out = _out()

    def show(c: res.Campaign) -> None:
        if args.json:
            print(json.dumps(_to_dict(c), ensure_ascii=False), file=out, flush=True)
        else:
            print(_progress_line(c), file=out, flush=True)

    final = client.wait_for_state(
        args.id, tuple(FINAL_CAMPAIGN_STATES), timeout=args.max_wait, poll=args.interval, on_change=show
    )
    if not args.json:
        print(f"campaign {final.id or args.id} is {_campaign_state_name(final.state)}", file=out)
    return 0


def cmd_campaigns_upload(client: WhagoClient, args: argparse.Namespace) -> int:
    media = client.upload_media(args.id, args.file, filename=args.filename, mime_type=args.mime_type)
    if args.json:
        _print_json(media)
    else:
        print(f"uploaded {media.filename} ({media.mime_type}, {media.size_bytes} bytes): media id {media.id}",
              file=_out())
    return 0


def cmd_chips_register(client: WhagoClient, args: argparse.Namespace) -> int:
    if not args.waha_key:
        raise ValueError("--waha-key is required (or set WAHA_API_KEY)")
    chip = client.register_chip(
        args.phone,
        args.waha_url,
        args.session,
        args.waha_key,
        display_name=args.name,
        proxy_label=args.proxy_label,
        pacing=_pacing(args),
    )
    return _show_chip(chip, args)


def _show_chip(chip: res.Chip, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(chip)
    else:
        _print_chip(chip)
    return 0


def cmd_chips_get(client: WhagoClient, args: argparse.Namespace) -> int:
    return _show_chip(client.get_chip(args.id), args)


def cmd_chips_list(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_chips(page_size=args.page_size)
    if args.json:
        _print_json_list(pager)
        return 0
    _print_table(
        ["ID", "PHONE", "NAME", "STATE", "WAHA", "SESSION", "PROXY"],
        (
            [ch.id, ch.phone, ch.display_name, _chip_state_name(ch.state), ch.waha_base_url,
             ch.waha_session, ch.proxy_label]
            for ch in pager
        ),
    )
    return 0


def cmd_chips_delete(client: WhagoClient, args: argparse.Namespace) -> int:
    client.delete_chip(args.id)
    if args.json:
        print(json.dumps({"deleted": args.id}), file=_out())
    else:
        print(f"deleted chip {args.id}", file=_out())
    return 0


# --------------------------------------------------------------------------- parser


def _state_arg(parse: Callable[[str], int]) -> Callable[[str], str]:
    """Validate a state name at parse time (argparse then reports it as a usage error)."""

    def check(value: str) -> str:
        try:
            parse(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return check


def _add_common(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Connection flags, accepted before or after the subcommand. On subcommands they default
    to SUPPRESS so they only override what was given before the subcommand."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--target", default=d(None),
                   help=f"host:port of campaign_service (env WHAGO_TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--api-key", default=d(None), help="API key (env WHAGO_API_KEY)")
    p.add_argument("--timeout", type=float, default=d(30.0), help="per-call deadline in seconds (default 30)")
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of tables")


def _add_pacing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval-min", type=float, metavar="S", help="minimum seconds between sends of a chip")
    p.add_argument("--interval-max", type=float, metavar="S", help="maximum seconds between sends of a chip")
    p.add_argument("--max-per-hour", type=int, metavar="N", help="cap on sends per hour per chip")
    p.add_argument("--max-per-day", type=int, metavar="N", help="cap on sends per day per chip")


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # generic for type checkers only


def _leaf(sub: Subparsers, name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
    """One command: its parser, with the connection options and its handler."""
    p = sub.add_parser(name, help=help_, description=help_)
    _add_common(p, suppress=True)
    p.set_defaults(func=handler)
    return p


def _add_campaign_crud(csub: Subparsers) -> None:
    p = _leaf(csub, "list", cmd_campaigns_list, "list campaigns, newest first")
    p.add_argument("--state", type=_state_arg(campaign_state), help="only this state, e.g. RUNNING")
    p.add_argument("--limit", type=int, help="stop after N campaigns")
    p.add_argument("--page-size", type=int, default=100, help=argparse.SUPPRESS)

    p = _leaf(csub, "get", cmd_campaigns_get, "show one campaign")
    p.add_argument("id")

    p = _leaf(csub, "create", cmd_campaigns_create, "create a DRAFT (or SCHEDULED) campaign")
    p.add_argument("--name", required=True)
    p.add_argument("--description", default="")
    p.add_argument("--text", action="append", required=True, metavar="T",
                   help="message template; repeat for variants that rotate (placeholders {{name}}, ...)")
    p.add_argument("--media", metavar="MEDIA_ID", help="media id attached to every template")
    p.add_argument("--chip", action="append", default=[], metavar="ID",
                   help="chip to send from; repeat; default all your chips")
    _add_pacing(p)
    p.add_argument("--max-failures", type=int, default=0, metavar="N", help="auto-pause after N failures")
    p.add_argument("--shuffle", action="store_true", help="send in random contact order")
    p.add_argument("--schedule", metavar="ISO8601", help="start time with UTC offset, e.g. 2030-01-31T09:00-03:00")
    p.add_argument("--request-id", help="idempotency key (default: a new UUID)")



def _add_campaign_lifecycle(csub: Subparsers) -> None:
    for name, method, text in (
        ("start", "start_campaign", "DRAFT/SCHEDULED -> RUNNING"),
        ("pause", "pause_campaign", "RUNNING -> PAUSED (returns once sending stopped)"),
        ("resume", "resume_campaign", "PAUSED -> RUNNING"),
        ("cancel", "cancel_campaign", "SCHEDULED/RUNNING/PAUSED -> CANCELLED"),
    ):
        _leaf(csub, name, _lifecycle(method), text).add_argument("id")



def _add_campaign_data(csub: Subparsers) -> None:
    """delete, and what a campaign holds: contacts (import, list), messages, media; watch."""
    p = _leaf(csub, "delete", cmd_campaigns_delete, "delete a DRAFT, CANCELLED or COMPLETED campaign")
    p.add_argument("id")
    p.add_argument("--etag", default="", help="refuse (ABORTED) if the campaign changed since")

    p = _leaf(csub, "import", cmd_campaigns_import,
             "stream contacts from a CSV (header: phone[,name,other columns as variables])")
    p.add_argument("id")
    p.add_argument("file")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--region", default="", help="region for numbers without country code (default: server's, BR)")

    p = _leaf(csub, "contacts", cmd_campaigns_contacts, "list a campaign's contacts")
    p.add_argument("id")
    p.add_argument("--limit", type=int)
    p.add_argument("--page-size", type=int, default=1000, help=argparse.SUPPRESS)

    p = _leaf(csub, "messages", cmd_campaigns_messages, "list a campaign's messages")
    p.add_argument("id")
    p.add_argument("--state", type=_state_arg(message_state), help="only this state, e.g. FAILED")
    p.add_argument("--limit", type=int)
    p.add_argument("--page-size", type=int, default=1000, help=argparse.SUPPRESS)

    p = _leaf(csub, "watch", cmd_campaigns_watch, "print progress until COMPLETED or CANCELLED")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--max-wait", type=float, default=None, help="give up after S seconds (default never)")

    p = _leaf(csub, "upload", cmd_campaigns_upload, "upload a media file for templates")
    p.add_argument("id")
    p.add_argument("file")
    p.add_argument("--filename")
    p.add_argument("--mime-type")


def _add_chips(hsub: Subparsers) -> None:
    p = _leaf(hsub, "register", cmd_chips_register, "register a chip")
    p.add_argument("--phone", required=True)
    p.add_argument("--waha-url", required=True, help="WAHA base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--session", required=True, help="WAHA session name")
    p.add_argument("--waha-key", default=os.environ.get("WAHA_API_KEY", ""),
                   help="WAHA API key (env WAHA_API_KEY)")
    p.add_argument("--name", default="", help="display name")
    p.add_argument("--proxy-label", default="")
    _add_pacing(p)

    _leaf(hsub, "list", cmd_chips_list, "list your chips").add_argument(
        "--page-size", type=int, default=100, help=argparse.SUPPRESS)
    _leaf(hsub, "get", cmd_chips_get, "show one chip").add_argument("id")
    _leaf(hsub, "delete", cmd_chips_delete, "delete a chip").add_argument("id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whago_client", description="WHAGO campaigns operator CLI."
    )
    _add_common(parser, suppress=False)
    groups = parser.add_subparsers(dest="group", metavar="{campaigns,chips}", required=True)
    camp = groups.add_parser("campaigns", help="campaigns and their contacts and messages")
    csub = camp.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_campaign_crud(csub)
    _add_campaign_lifecycle(csub)
    _add_campaign_data(csub)
    chips = groups.add_parser("chips", help="your WhatsApp numbers (WAHA sessions)")
    _add_chips(chips.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv and fill connection settings from the environment."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.target = args.target or os.environ.get("WHAGO_TARGET") or DEFAULT_TARGET
    args.api_key = args.api_key or os.environ.get("WHAGO_API_KEY") or None
    if not args.api_key:
        parser.error("no API key: pass --api-key or set WHAGO_API_KEY")
    return args


def print_error(e: WhagoError, file: TextIO | None = None) -> None:
    """`error: <CODE>: <message>` then one indented line per field violation."""
    file = file or sys.stderr
    print(f"error: {e.code.name}: {e.message}", file=file)
    for field, description in e.field_violations:
        print(f"  {field}: {description}", file=file)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with WhagoClient(args.target, args.api_key, timeout=args.timeout) as client:
            handler: Handler = args.func
            return handler(client, args)
    except WhagoError as e:
        print_error(e)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; not an error worth a message
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (OSError, ValueError, csv.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
