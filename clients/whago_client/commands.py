"""The CLI's commands: one handler per command, each (client, parsed args) -> exit code."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from google.protobuf.message import Message

from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import resources_pb2 as res
from whago_client.client import WhagoClient
from whago_client.inputs import read_contacts_csv
from whago_client.output import (
    ImportProgress,
    ProgressBar,
    campaign_state_name,
    chip_state_name,
    count_data_lines,
    credit_kind_name,
    message_state_name,
    print_campaign,
    print_chip,
    print_json,
    print_json_list,
    print_table,
    progress_line_from,
    stdout,
    to_dict,
    when,
)

Handler = Callable[[WhagoClient, argparse.Namespace], int]

#: `campaigns watch` saw the campaign end CANCELLED or deleted, not COMPLETED (see cli.EXIT_CODES).
EXIT_NOT_COMPLETED = 8


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
        print_json_list(items)
        return 0
    print_table(
        ["ID", "NAME", "STATE", "CONTACTS", "PENDING", "SENT", "FAILED", "CREATED"],
        (
            [c.id, c.name, campaign_state_name(c.state), c.total_contacts, c.pending_count,
             c.sent_count, c.failed_count, when(c, "create_time")]
            for c in items
        ),
    )
    return 0


def _show_campaign(c: res.Campaign, args: argparse.Namespace) -> int:
    if args.json:
        print_json(c)
    else:
        print_campaign(c)
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


def lifecycle(method_name: str) -> Handler:
    def run(client: WhagoClient, args: argparse.Namespace) -> int:
        method: Callable[[str], res.Campaign] = getattr(client, method_name)
        return _show_campaign(method(args.id), args)

    return run


def cmd_campaigns_delete(client: WhagoClient, args: argparse.Namespace) -> int:
    resp = client.delete_campaign(args.id, etag=args.etag)
    if args.json:
        print_json(resp)
    else:
        print(
            f"deleted campaign {resp.campaign_id or args.id}: {resp.deleted_contacts} contacts, "
            f"{resp.deleted_messages} messages, {resp.deleted_media} media, "
            f"{resp.revoked_jobs} jobs revoked",
            file=stdout(),
        )
    return 0


def cmd_campaigns_import(client: WhagoClient, args: argparse.Namespace) -> int:
    """Streams the CSV; on a terminal (not --json) a live bar shows rows sent and the rate."""
    rows: Iterable[cs.ContactInput] = read_contacts_csv(args.file)  # header checked now, rows streamed
    out = stdout()
    bar = ImportProgress(out, count_data_lines(args.file)) if not args.json and out.isatty() else None
    try:
        resp: cs.ImportContactsResponse = client.import_contacts(
            args.id, bar.rows(rows) if bar is not None else rows, batch_size=args.batch_size,
            default_region=args.region
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(resp)
        return 0
    print(
        f"imported={resp.imported_count} duplicates={resp.duplicate_count} "
        f"rejected={resp.rejected_count} total_contacts={resp.total_contacts}",
        file=stdout(),
    )
    if resp.rejected:
        print_table(["ROW", "PHONE", "REASON"], ([r.row, r.phone, r.reason] for r in resp.rejected))
        if resp.rejected_count > len(resp.rejected):
            print(f"... and {resp.rejected_count - len(resp.rejected)} more rejected rows", file=stdout())
    return 0


def cmd_campaigns_contacts(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_contacts(args.id, page_size=args.page_size)
    items: Iterable[res.Contact] = itertools.islice(pager, args.limit) if args.limit else pager
    if args.json:
        print_json_list(items)
        return 0
    print_table(
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
        print_json_list(items)
        return 0
    print_table(
        ["ID", "PHONE", "CHIP", "STATE", "ATTEMPTS", "SENT", "REASON"],
        (
            [m.id, m.phone, m.chip_id, message_state_name(m.state), m.attempts,
             when(m, "sent_time"), m.failure_reason]
            for m in items
        ),
    )
    return 0


def cmd_campaigns_watch(client: WhagoClient, args: argparse.Namespace) -> int:
    """Follows WatchCampaign (no polling): a live progress bar on a terminal, one line (or JSON
    document) per change otherwise."""
    out = stdout()
    bar = ProgressBar(out) if not args.json and out.isatty() else None
    state = ""
    try:
        for msg in client.watch(args.id, timeout=args.max_wait):
            if msg.WhichOneof("kind") == "snapshot":
                c = msg.snapshot.campaign
                state = campaign_state_name(c.state)
                counts = {k: getattr(c, k) for k in ("total_contacts", "pending_count", "sent_count",
                                                     "failed_count", "skipped_count")}
                doc: dict[str, object] = {"snapshot": to_dict(msg.snapshot)}
            else:
                data = dict(msg.event.data)
                state = str(data.get("state", state))
                counts = {k: int(v) for k, v in data.items()  # type: ignore[arg-type]
                          if k.endswith("_count") or k == "total_contacts"}
                doc = {"event": to_dict(msg.event)}
            if args.json:
                print(json.dumps(doc, ensure_ascii=False), file=out, flush=True)
            elif bar is not None:
                bar.update(state, counts)
            else:
                print(progress_line_from(state, counts), file=out, flush=True)
    finally:
        if bar is not None:
            bar.close()
    if not args.json:
        print(f"campaign {args.id} is {state or 'gone'}", file=out)
    return 0 if state == "COMPLETED" else EXIT_NOT_COMPLETED  # `watch ID && next step` in scripts


def cmd_campaigns_upload(client: WhagoClient, args: argparse.Namespace) -> int:
    media = client.upload_media(args.id, args.file, filename=args.filename, mime_type=args.mime_type)
    if args.json:
        print_json(media)
    else:
        print(f"uploaded {media.filename} ({media.mime_type}, {media.size_bytes} bytes): media id {media.id}",
              file=stdout())
    return 0


def cmd_campaigns_media(client: WhagoClient, args: argparse.Namespace) -> int:
    media = client.list_media(args.id)
    if args.json:
        print_json_list(media)
        return 0
    print_table(["ID", "FILENAME", "TYPE", "BYTES"],
                ([m.id, m.filename, m.mime_type, str(m.size_bytes)] for m in media))
    return 0


def cmd_campaigns_delete_media(client: WhagoClient, args: argparse.Namespace) -> int:
    resp = client.delete_media(args.id, args.media_id)
    if args.json:
        print_json(resp)
    else:
        kept = "" if resp.file_deleted else " (the stored file stays: another campaign of yours uses it)"
        print(f"deleted media {resp.media_id}{kept}", file=stdout())
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


def cmd_chips_update(client: WhagoClient, args: argparse.Namespace) -> int:
    warmup = {None: None, "default": res.WarmupPlan(enabled=True), "off": res.WarmupPlan(enabled=False)}[args.warmup]
    pacing = _pacing(args)
    if pacing is not None:  # the options given change; the chip's other pacing fields stay
        merged = client.get_chip(args.id).pacing
        merged.MergeFrom(pacing)
        pacing = merged
    chip = client.update_chip(args.id, display_name=args.name, proxy_label=args.proxy_label, pacing=pacing,
                              warmup=warmup, waha_api_key=args.waha_key, waha_base_url=args.waha_url,
                              waha_session=args.session)
    return _show_chip(chip, args)


def _show_chip(chip: res.Chip, args: argparse.Namespace) -> int:
    if args.json:
        print_json(chip)
    else:
        print_chip(chip)
    return 0


def cmd_chips_get(client: WhagoClient, args: argparse.Namespace) -> int:
    return _show_chip(client.get_chip(args.id), args)


def cmd_chips_list(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_chips(page_size=args.page_size)
    if args.json:
        print_json_list(pager)
        return 0
    print_table(
        ["ID", "PHONE", "NAME", "STATE", "WAHA", "SESSION", "PROXY"],
        (
            [ch.id, ch.phone, ch.display_name, chip_state_name(ch.state), ch.waha_base_url,
             ch.waha_session, ch.proxy_label]
            for ch in pager
        ),
    )
    return 0


def cmd_chips_delete(client: WhagoClient, args: argparse.Namespace) -> int:
    client.delete_chip(args.id)
    if args.json:
        print(json.dumps({"deleted": args.id}), file=stdout())
    else:
        print(f"deleted chip {args.id}", file=stdout())
    return 0


def cmd_credits_balance(client: WhagoClient, args: argparse.Namespace) -> int:
    b = client.get_credit_balance()
    if args.json:
        print_json(b)
    else:
        print_table(["AVAILABLE", "RESERVED"], [[b.available, b.reserved]])
    return 0


def cmd_credits_transactions(client: WhagoClient, args: argparse.Namespace) -> int:
    pager = client.list_credit_transactions(campaign_id=args.campaign or "", kind=args.kind,
                                            page_size=args.page_size)
    items: Iterable[crs.CreditTransaction] = itertools.islice(pager, args.limit) if args.limit else pager
    if args.json:
        print_json_list(items)
        return 0
    print_table(
        ["ID", "TIME", "KIND", "AMOUNT", "CAMPAIGN", "DESCRIPTION"],
        ([t.id, when(t, "create_time"), credit_kind_name(t.kind), t.amount, t.campaign_id, t.description]
         for t in items),
    )
    return 0
