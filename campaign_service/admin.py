"""Operator commands: `python -m campaign_service.admin migrate | create-user | add-credits |
seal-chip-keys | set-limits`.

create-user prints the new API key alone on the last line of stdout (scripts and tests read it);
only its hash is stored. Credits are granted through the ledger (a GRANT entry, in the same
transaction as the user row for create-user); add-credits with a negative amount removes credits,
never more than are available."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.orm import Session

from campaign_service import audit, auth, config
from campaign_service.db import migrate
from campaign_service.db.engine import Database
from campaign_service.db.models import Chip, UserLimits, WebhookEndpoint
from campaign_service.relay import signing
from campaign_service.repository import credits as credits_repo
from campaign_service.repository import users as users_repo
from campaign_service.secrets_box import SecretBox
from campaign_service.urlguard import RefusedURL, URLGuard, parse_allowlist


def cmd_migrate(settings: config.Settings, args: argparse.Namespace) -> int:
    migrate.upgrade(settings.session_url)
    print("database migrated to head", file=sys.stderr)
    return 0


def cmd_create_user(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.credits < 0:
        print("--credits must be >= 0", file=sys.stderr)
        return 2
    key = auth.new_api_key()
    db = Database(settings.database_url, pool_size=1)
    try:
        with db.transaction() as s:
            user = users_repo.create(s, name=args.name, key_hash=auth.hash_key(key), webhook_url=None)
            user_id = user.id
            if args.credits:
                credits_repo.grant(s, user_id, args.credits, args.description or "initial credits")
            secret = None
            if args.webhook_url:
                URLGuard(parse_allowlist(settings.webhook_allow_cidrs)).check(args.webhook_url)
                secret = signing.new_secret()
                s.add(WebhookEndpoint(user_id=user_id, url=args.webhook_url, secret=secret,
                                      description="created by admin create-user"))
                audit.record(s, user_id=user_id, action="webhook.create", entity_type="webhook",
                             entity_id=args.webhook_url, description="Webhook endpoint created by the operator.",
                             extra_data={"url": args.webhook_url}, actor=audit.OPERATOR)
    except RefusedURL as exc:
        print(f"--webhook-url: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    print(f"user {user_id} ({args.name}) created with {args.credits} credits; API key:")
    print(key)
    if secret is not None:
        print(f"webhook signing secret (Standard Webhooks): {secret}", file=sys.stderr)
    return 0


@contextmanager
def _transaction(settings: config.Settings) -> Iterator[Session]:
    """One transaction on a one-connection engine, disposed after (each command is one process)."""
    db = Database(settings.database_url, pool_size=1)
    try:
        with db.transaction() as s:
            yield s
    finally:
        db.dispose()


def _user_id(raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except ValueError:
        print(f"--user-id: not a user id: {raw!r}", file=sys.stderr)
        return None


def cmd_seal_chip_keys(settings: config.Settings, args: argparse.Namespace) -> int:
    """Seal every chip WAHA API key under the first of WHAGO_SECRET_KEYS: keys stored before sealing
    existed, or under a key being rotated out."""
    box = SecretBox(settings.secret_keys)
    with _transaction(settings) as s:
        chips = s.execute(select(Chip).where(Chip.waha_api_key != "").with_for_update()).scalars().all()
        for chip in chips:
            chip.waha_api_key = box.reseal(chip.waha_api_key)
    print(f"{len(chips)} chip API keys sealed", file=sys.stderr)
    return 0


def cmd_set_limits(settings: config.Settings, args: argparse.Namespace) -> int:
    """Per-user quotas and RPC rate over the defaults (a negative value puts the default back)."""
    user_id = _user_id(args.user_id)
    if user_id is None:
        return 2
    names = ("campaigns", "contacts_per_campaign", "chips", "rpc_per_second")
    with _transaction(settings) as s:
        row = s.get(UserLimits, user_id) or UserLimits(user_id=user_id)
        for name in names:
            value = getattr(args, name)
            if value is not None:
                setattr(row, name, None if value < 0 else value)
        s.add(row)
        audit.record(s, user_id=user_id, action="user.set_limits", entity_type="user", entity_id=str(user_id),
                     description="Limits set by the operator.", actor=audit.OPERATOR,
                     extra_data={n: getattr(row, n) for n in names})
    print(f"limits of {user_id} set", file=sys.stderr)
    return 0


def cmd_add_credits(settings: config.Settings, args: argparse.Namespace) -> int:
    user_id = _user_id(args.user_id)
    if user_id is None:
        return 2
    db = Database(settings.database_url, pool_size=1)
    try:
        with db.transaction() as s:
            if users_repo.get(s, user_id) is None:
                print(f"no user {user_id}", file=sys.stderr)
                return 1
            description = args.description or ("credits added" if args.credits >= 0 else "credits removed")
            balance = credits_repo.grant(s, user_id, args.credits, description)
            if balance is None:
                have = credits_repo.balance(s, user_id)
                print(f"cannot remove {-args.credits} credits: {have.available if have else 0} available",
                      file=sys.stderr)
                return 1
    finally:
        db.dispose()
    print(balance.available)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m campaign_service.admin")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="alembic upgrade head on DATABASE_URL").set_defaults(fn=cmd_migrate)
    cu = sub.add_parser("create-user", help="create a user; prints the API key on the last line")
    cu.add_argument("--name", required=True)
    cu.add_argument("--credits", type=int, default=0)
    cu.add_argument("--webhook-url", default=None,
                    help="also register a webhook endpoint (manage endpoints with WebhookService)")
    cu.add_argument("--description", default="", help="note on the GRANT ledger entry")
    cu.set_defaults(fn=cmd_create_user)
    ac = sub.add_parser("add-credits", help="grant credits through the ledger (negative: remove, at most the "
                        "available ones); prints the new available balance")
    ac.add_argument("--user-id", required=True)
    ac.add_argument("--credits", type=int, required=True)
    ac.add_argument("--description", default="", help="note on the GRANT ledger entry")
    ac.set_defaults(fn=cmd_add_credits)
    sk = sub.add_parser("seal-chip-keys", help="seal every chip WAHA API key under the first of WHAGO_SECRET_KEYS "
                        "(after adding a key in front, or for keys stored before sealing)")
    sk.set_defaults(fn=cmd_seal_chip_keys)
    sl = sub.add_parser("set-limits", help="a user's quotas and RPC rate (calls/s) over the service defaults; "
                        "a negative value restores the default")
    sl.add_argument("--user-id", required=True)
    sl.add_argument("--campaigns", type=int)
    sl.add_argument("--contacts-per-campaign", type=int)
    sl.add_argument("--chips", type=int)
    sl.add_argument("--rpc-per-second", type=float)
    sl.set_defaults(fn=cmd_set_limits)
    args = p.parse_args(argv)
    return int(args.fn(config.load(), args))


if __name__ == "__main__":
    sys.exit(main())
