"""The credit ledger: the one place that writes credit_transactions and the balance counters.

Every change is one statement: the users row is updated (and, for a debit, guarded: `WHERE
credits >= n`) and the ledger rows are inserted from its RETURNING, so a counter never moves
without its entry, nor an entry without its counter. The row lock of that UPDATE is what
serialises concurrent Starts of one user: PostgreSQL re-checks the guard on the latest row
after waiting, so exactly the affordable ones pass.

    available (users.credits)          = GRANT - RESERVE + RELEASE
    reserved  (users.credits_reserved
               - credits_unfolded of the user's RUNNING/PAUSED campaigns) = RESERVE - CONSUME - RELEASE

Entries are aggregated per operation (one RESERVE per Start, one CONSUME and one RELEASE per batch
of delivery reports, one RELEASE per Cancel), never one row per message. Amounts are >= 0, except
a GRANT, which is negative when the operator removes credits.

A running campaign's CONSUME (its messages sent) moves no available credit, so it does not touch the
users row: it adds to the campaign's `credits_unfolded` (the row every delivery report locks anyway)
and writes its ledger row; `fold` takes the sum off users.credits_reserved when the campaign leaves
RUNNING/PAUSED (completion, Cancel, a reverted Start). Why: the users row is the one lock all of a
tenant's lanes share; with it in every report, one tenant's 1,000 lanes queued on it (migration 0015).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaign_service.db.models import CreditTransaction
from campaign_service.states import CampaignState, CreditKind

# States in which a campaign may hold consumed credits not yet folded into its user's row.
_UNFOLDED_STATES = f"{CampaignState.RUNNING:d}, {CampaignState.PAUSED:d}"
# What the user's running campaigns consumed that users.credits_reserved still counts (:u).
_UNFOLDED = ("(SELECT COALESCE(sum(credits_unfolded), 0) FROM campaigns"
             f" WHERE user_id = :u AND state IN ({_UNFOLDED_STATES}))")


@dataclass(frozen=True)
class Balance:
    available: int
    reserved: int


@dataclass(frozen=True)
class Entry:
    kind: CreditKind
    amount: int
    description: str


_APPLY = text("""
WITH u AS (
    UPDATE users SET credits = credits + :d_available, credits_reserved = credits_reserved + :d_reserved
    WHERE id = :u AND credits + :d_available >= :floor
    RETURNING credits, credits_reserved
), t AS (
    INSERT INTO credit_transactions (user_id, campaign_id, kind, amount, description)
    SELECT :u, :c, e.kind, e.amount, e.description
    FROM u, unnest(CAST(:kinds AS smallint[]), CAST(:amounts AS bigint[]), CAST(:descriptions AS text[]))
         WITH ORDINALITY AS e(kind, amount, description, ord)
    ORDER BY e.ord
    RETURNING 1
)
SELECT credits, credits_reserved - """ + _UNFOLDED + """ AS credits_reserved FROM u
""")


def _apply(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID | None, entries: list[Entry],
           floor: int = -(2**62)) -> Balance | None:
    """Write `entries` and move the counters by their effect, if available stays >= floor (None:
    nothing written, because the user does not exist or the guard failed)."""
    d_available = d_reserved = 0
    for e in entries:
        if e.kind == CreditKind.GRANT:
            d_available += e.amount
        elif e.kind == CreditKind.RESERVE:
            d_available -= e.amount
            d_reserved += e.amount
        elif e.kind == CreditKind.CONSUME:
            d_reserved -= e.amount
        elif e.kind == CreditKind.RELEASE:
            d_available += e.amount
            d_reserved -= e.amount
        else:
            raise ValueError(f"not a ledger entry kind: {e.kind!r}")
    row = session.execute(_APPLY, {
        "u": user_id, "c": campaign_id, "d_available": d_available, "d_reserved": d_reserved, "floor": floor,
        "kinds": [int(e.kind) for e in entries], "amounts": [e.amount for e in entries],
        "descriptions": [e.description for e in entries],
    }).one_or_none()
    return None if row is None else Balance(int(row.credits), int(row.credits_reserved))


_CONSUME_ON_CAMPAIGN = text(f"""
WITH c AS (
    UPDATE campaigns SET credits_unfolded = credits_unfolded + :n
    WHERE id = :c AND state IN ({_UNFOLDED_STATES}) RETURNING 1
), t AS (
    INSERT INTO credit_transactions (user_id, campaign_id, kind, amount, description)
    SELECT :u, :c, {CreditKind.CONSUME:d}, :n, :d FROM c
    RETURNING 1
)
SELECT count(*) FROM c
""")

_FOLD = text("""
WITH f AS (
    UPDATE campaigns c SET credits_unfolded = 0 FROM campaigns o
    WHERE c.id = :c AND o.id = :c AND o.credits_unfolded <> 0
    RETURNING o.credits_unfolded AS n
)
UPDATE users SET credits_reserved = credits_reserved - f.n FROM f WHERE users.id = :u
""")


def _consume(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, n: int, description: str) -> None:
    """CONSUME n reserved credits of a campaign: on the campaign row while it runs (see the module's
    docstring), on the users row otherwise (a campaign that just completed in this transaction)."""
    if not session.execute(_CONSUME_ON_CAMPAIGN, {"u": user_id, "c": campaign_id, "n": n,
                                                  "d": description}).scalar_one():
        _apply(session, user_id, campaign_id, [Entry(CreditKind.CONSUME, n, description)])


def fold(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> None:
    """Take what the campaign consumed off its user's reservation, as it leaves RUNNING/PAUSED (the
    caller holds the campaign row). No ledger row: its CONSUME rows were written as it happened."""
    session.execute(_FOLD, {"u": user_id, "c": campaign_id})


def grant(session: Session, user_id: uuid.UUID, amount: int, description: str) -> Balance | None:
    """The operator adds `amount` credits (negative: removes them, never below zero available).
    None when the user does not exist or a removal exceeds the available credits."""
    if amount == 0:
        return balance(session, user_id, lock=True)
    return _apply(session, user_id, None, [Entry(CreditKind.GRANT, amount, description)], floor=0)


def reserve(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, n: int, description: str
            ) -> Balance | None:
    """Move n credits from available to reserved; None (nothing written) when fewer are available."""
    if n <= 0:
        return balance(session, user_id, lock=True)
    return _apply(session, user_id, campaign_id, [Entry(CreditKind.RESERVE, n, description)], floor=0)


def release(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, n: int, description: str) -> None:
    """Return n reserved credits to available (messages that will never be sent)."""
    if n > 0:
        _apply(session, user_id, campaign_id, [Entry(CreditKind.RELEASE, n, description)])


@dataclass(frozen=True)
class Settlement:
    consumed: int  # reservations spent by sent messages
    released: int  # reservations returned (failed, skipped)
    late_sent: int  # messages whose credit had been released, reported sent afterwards
    late_charged: int  # of which charged again (at most the available credits)


def settle(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, *, sent: int, failed: int,
           skipped: int, late_sent: int) -> Settlement:
    """What a batch of delivery reports did to the reservations, as at most one CONSUME and one
    RELEASE row (plus a RESERVE and a CONSUME for late sends, on the users row).

    `sent`: messages that went from not final (PENDING/SENDING) to sent (SENT/DELIVERED/READ),
    `failed`/`skipped`: not final -> FAILED/SKIPPED. `late_sent`: FAILED/SKIPPED -> sent (the truth
    wins: e.g. a send that reached WAHA while a Cancel released its credit); its credit is
    reserved and consumed again, as far as the available credits go (available never goes below
    zero; what cannot be charged is named in the entry's description)."""
    charged = 0
    if late_sent > 0:
        have = session.execute(text("SELECT credits FROM users WHERE id = :u FOR UPDATE"),
                               {"u": user_id}).scalar_one_or_none() or 0
        charged = max(0, min(late_sent, int(have)))
    entries: list[Entry] = []
    if charged:
        note = f"{late_sent} message(s) reported sent after their credit was released"
        if charged < late_sent:
            note += f"; {late_sent - charged} not charged (no credits available)"
        entries += [Entry(CreditKind.RESERVE, charged, note), Entry(CreditKind.CONSUME, charged, note)]
    if sent:
        _consume(session, user_id, campaign_id, sent, f"{sent} message(s) sent")
    if failed + skipped:
        parts = [f"{n} {what}" for n, what in ((failed, "failed"), (skipped, "skipped")) if n]
        entries.append(Entry(CreditKind.RELEASE, failed + skipped, "message(s) not sent: " + ", ".join(parts)))
    if entries:
        _apply(session, user_id, campaign_id, entries)
    return Settlement(sent, failed + skipped, late_sent, charged)


_BALANCE = f"SELECT credits, credits_reserved - {_UNFOLDED} FROM users WHERE id = :u"
_BALANCE_READ = text(_BALANCE)
_BALANCE_LOCKED = text(_BALANCE + " FOR UPDATE")


def balance(session: Session, user_id: uuid.UUID, *, lock: bool = False) -> Balance | None:
    row = session.execute(_BALANCE_LOCKED if lock else _BALANCE_READ, {"u": user_id}).one_or_none()
    return None if row is None else Balance(int(row[0]), int(row[1]))


def page(session: Session, user_id: uuid.UUID, limit: int, before_id: int | None,
         campaign_id: uuid.UUID | None = None, kind: int = 0) -> list[CreditTransaction]:
    """Newest first (id DESC, ix_credit_tx_user / ix_credit_tx_campaign), ids below `before_id`."""
    q = select(CreditTransaction).where(CreditTransaction.user_id == user_id)
    if campaign_id is not None:
        q = q.where(CreditTransaction.campaign_id == campaign_id)
    if kind:
        q = q.where(CreditTransaction.kind == kind)
    if before_id is not None:
        q = q.where(CreditTransaction.id < before_id)
    return list(session.execute(q.order_by(CreditTransaction.id.desc()).limit(limit)).scalars())


@dataclass(frozen=True)
class LedgerSums:
    """The ledger summed by kind, for checks (tests, operators): what the counters must equal."""

    grants: int
    reserves: int
    consumes: int
    releases: int

    @property
    def available(self) -> int:
        return self.grants - self.reserves + self.releases

    @property
    def reserved(self) -> int:
        return self.reserves - self.consumes - self.releases


def sums(session: Session, user_id: uuid.UUID) -> LedgerSums:
    row = session.execute(text(f"""
        SELECT COALESCE(sum(amount) FILTER (WHERE kind = {CreditKind.GRANT:d}), 0) AS grants,
               COALESCE(sum(amount) FILTER (WHERE kind = {CreditKind.RESERVE:d}), 0) AS reserves,
               COALESCE(sum(amount) FILTER (WHERE kind = {CreditKind.CONSUME:d}), 0) AS consumes,
               COALESCE(sum(amount) FILTER (WHERE kind = {CreditKind.RELEASE:d}), 0) AS releases
        FROM credit_transactions WHERE user_id = :u"""), {"u": user_id}).one()
    return LedgerSums(int(row.grants), int(row.reserves), int(row.consumes), int(row.releases))
