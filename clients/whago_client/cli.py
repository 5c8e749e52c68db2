"""Operator CLI: `python -m whago_client campaigns list`, `... campaigns watch ID`, `... credits`, etc.

Human-readable tables by default, `--json` for scripts. Failures print
`error: <CODE>: <message>` (plus one `  field: description` line per field violation) on
stderr, or with --json one JSON document there, and exit with a code per kind of status
(`EXIT_CODES`) — never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO, TypeAlias

import grpc

from whago_client.client import DEFAULT_TARGET, WhagoClient
from whago_client.commands import EXIT_NOT_COMPLETED as EXIT_NOT_COMPLETED
from whago_client.commands import (
    Handler,
    cmd_campaigns_contacts,
    cmd_campaigns_create,
    cmd_campaigns_delete,
    cmd_campaigns_delete_media,
    cmd_campaigns_get,
    cmd_campaigns_import,
    cmd_campaigns_list,
    cmd_campaigns_media,
    cmd_campaigns_messages,
    cmd_campaigns_upload,
    cmd_campaigns_watch,
    cmd_chips_delete,
    cmd_chips_get,
    cmd_chips_list,
    cmd_chips_register,
    cmd_chips_update,
    cmd_credits_balance,
    cmd_credits_transactions,
    lifecycle,
)
from whago_client.errors import WhagoError
from whago_client.inputs import campaign_state, credit_kind, message_state

__all__ = ["EXIT_CODES", "EXIT_NOT_COMPLETED", "build_parser", "exit_code_for", "main"]

_S = grpc.StatusCode
#: Exit status by kind of failure, so scripts can tell "fix your input" from "try again later".
#: 0 success; 1 any other error (a local file, CSV, an unexpected status); 2 usage (argparse, no
#: API key); EXIT_NOT_COMPLETED (8) `campaigns watch` saw the campaign end other than COMPLETED;
#: 130 interrupted.
EXIT_CODES: dict[grpc.StatusCode, int] = {
    _S.INVALID_ARGUMENT: 3, _S.OUT_OF_RANGE: 3,                                  # the request is wrong
    _S.NOT_FOUND: 4,                                                             # no such thing (of yours)
    _S.FAILED_PRECONDITION: 5, _S.ABORTED: 5, _S.ALREADY_EXISTS: 5,              # not in this state
    _S.UNAUTHENTICATED: 6, _S.PERMISSION_DENIED: 6,                              # the API key
    _S.UNAVAILABLE: 7, _S.DEADLINE_EXCEEDED: 7, _S.RESOURCE_EXHAUSTED: 7,        # transient: retry later
}


def exit_code_for(e: WhagoError) -> int:
    return EXIT_CODES.get(e.code, 1)


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
        _leaf(csub, name, lifecycle(method), text).add_argument("id")



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

    p = _leaf(csub, "watch", cmd_campaigns_watch,
              "follow a campaign (WatchCampaign: a progress bar on a terminal) until it is final")
    p.add_argument("id")
    p.add_argument("--max-wait", type=float, default=None, help="give up after S seconds (default never)")

    p = _leaf(csub, "upload", cmd_campaigns_upload, "upload a media file for templates")
    p.add_argument("id")
    p.add_argument("file")
    p.add_argument("--filename")
    p.add_argument("--mime-type")

    p = _leaf(csub, "media", cmd_campaigns_media, "list a campaign's media")
    p.add_argument("id")

    p = _leaf(csub, "delete-media", cmd_campaigns_delete_media,
              "delete a media file no template uses (DRAFT/SCHEDULED campaigns)")
    p.add_argument("id")
    p.add_argument("media_id")


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

    p = _leaf(hsub, "update", cmd_chips_update,
              "change a chip (pacing, warm-up and WAHA connection only while no running campaign uses it)")
    p.add_argument("id")
    p.add_argument("--name", help="display name")
    p.add_argument("--proxy-label")
    p.add_argument("--waha-url", help="WAHA base URL")
    p.add_argument("--session", help="WAHA session name")
    p.add_argument("--waha-key", help="new WAHA API key")
    p.add_argument("--warmup", choices=["default", "off"], help="restore the default warm-up plan, or none")
    _add_pacing(p)


def _add_credits(groups: Subparsers) -> None:
    p = groups.add_parser("credits", help="your credit balance (and, with `transactions`, the ledger)",
                          description="your credit balance: available and reserved by unsent messages")
    _add_common(p, suppress=True)
    p.set_defaults(func=cmd_credits_balance)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _leaf(sub, "balance", cmd_credits_balance, "available and reserved credits")
    t = _leaf(sub, "transactions", cmd_credits_transactions, "the credit ledger, newest first")
    t.add_argument("--campaign", help="only the entries of this campaign")
    t.add_argument("--kind", type=_state_arg(credit_kind), help="only GRANT, RESERVE, CONSUME or RELEASE")
    t.add_argument("--limit", type=int, help="stop after N entries")
    t.add_argument("--page-size", type=int, default=100, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whago_client", description="WHAGO campaigns operator CLI."
    )
    _add_common(parser, suppress=False)
    groups = parser.add_subparsers(dest="group", metavar="{campaigns,chips,credits}", required=True)
    camp = groups.add_parser("campaigns", help="campaigns and their contacts and messages")
    csub = camp.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_campaign_crud(csub)
    _add_campaign_lifecycle(csub)
    _add_campaign_data(csub)
    chips = groups.add_parser("chips", help="your WhatsApp numbers (WAHA sessions)")
    _add_chips(chips.add_subparsers(dest="command", metavar="COMMAND", required=True))
    _add_credits(groups)
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


def print_error(e: WhagoError, file: TextIO | None = None, *, as_json: bool = False) -> None:
    """`error: <CODE>: <message>` then one indented line per field violation; with --json one
    document, so a script reading stderr as JSON gets the details too."""
    file = file or sys.stderr
    if as_json:
        doc = {"error": {"code": e.code.name, "message": e.message, "reason": e.reason, "domain": e.domain,
                         "metadata": e.metadata, "retry_delay": e.retry_delay,
                         "field_violations": [{"field": f, "description": d} for f, d in e.field_violations]}}
        print(json.dumps(doc, ensure_ascii=False), file=file)
        return
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
        print_error(e, as_json=args.json)
        return exit_code_for(e)
    except BrokenPipeError:  # `... | head`: the reader left; not an error worth a message
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (OSError, ValueError, csv.Error) as e:
        if args.json:
            print(json.dumps({"error": {"code": "LOCAL", "message": str(e)}}, ensure_ascii=False), file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
