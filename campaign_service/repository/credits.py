"""The credit ledger: the one place that writes credit_transactions and the balance counters.

Every change is one statement: a counter row is updated (and, for a debit, guarded: `WHERE
credits >= n`) and the ledger rows are inserted from its RETURNING, so a counter never moves
without its entry, nor an entry without its counter. The row lock of that UPDATE is what
serialises concurrent Starts of one user: PostgreSQL re-checks the guard on the latest row
after waiting, so exactly the affordable ones pass.

    available = users.credits + R                          = GRANT - RESERVE + RELEASE
    reserved  = users.credits_reserved - C - R             = RESERVE - CONSUME - RELEASE

where C and R sum `credits_consumed_unfolded` / `credits_released_unfolded` over the user's
RUNNING and PAUSED campaigns. Delivery reports settle a running campaign's messages on the campaign
row (which every report locks anyway): its CONSUME and RELEASE entries are written as they happen,
their counts add up there, and `fold` moves them onto the users row when the campaign leaves
RUNNING/PAUSED (completion, Cancel, a reverted Start). Why: the users row is the one lock all of a
tenant's lanes share; with it in every report, one tenant's 1,000 lanes queued on it (migration 0015).

Entries are aggregated per operation (one RESERVE per Start, one CONSUME and one RELEASE per batch
of delivery reports, one RELEASE per Cancel), never one row per message. Amounts are >= 0, except
a GRANT, which is negative when the operator removes credits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaign_service.db.engine import PreparedText, execute_prepared
from campaign_service.db.models import CreditTransaction
from campaign_service.states import CampaignState, CreditKind

# States in which a campaign may hold credits not yet folded into its user's row.
_UNFOLDED_STATES = f"{CampaignState.RUNNING:d}, {CampaignState.PAUSED:d}"


# What the user's (:u) running campaigns settled that the users row does not show yet, one row.
_UNFOLDED = ("(SELECT COALESCE(sum(credits_consumed_unfolded), 0) AS consumed,"
             " COALESCE(sum(credits_released_unfolded), 0) AS released FROM campaigns"
             f" WHERE user_id = :u AND state IN ({_UNFOLDED_STATES})) f")
# The balance of the ledger's definition: the users row `u` (a CTE or the table) joined to _UNFOLDED.
_BALANCE_COLUMNS = "u.credits + f.released AS credits, u.credits_reserved - f.consumed - f.released AS credits_reserved"


@dataclass(frozen=True)
class Balance:
    available: int
    reserved: int


@dataclass(frozen=True)
class Entry:
    kind: CreditKind
    amount: int
    description: str


_ENTRIES = """
    INSERT INTO credit_transactions (user_id, campaign_id, kind, amount, description)
    SELECT :u, :c, e.kind, e.amount, e.description
    FROM {source}, unnest(CAST(:kinds AS smallint[]), CAST(:amounts AS bigint[]), CAST(:descriptions AS text[]))
         WITH ORDINALITY AS e(kind, amount, description, ord)
    ORDER BY e.ord
    RETURNING 1"""

_APPLY = text(f"""
WITH u AS (
    UPDATE users SET credits = credits + :d_available, credits_reserved = credits_reserved + :d_reserved
    WHERE id = :u AND credits + :d_available + (SELECT released FROM {_UNFOLDED}) >= :floor
    RETURNING credits, credits_reserved
), t AS ({_ENTRIES.format(source="u")}
)
SELECT {_BALANCE_COLUMNS} FROM u, {_UNFOLDED}
""")

# A running campaign's CONSUME/RELEASE entries, counted on its row (nothing when it is not running).
# Every counting ReportDeliveries runs it: prepared once per connection (db/engine.py PreparedText).
_APPLY_ON_CAMPAIGN = PreparedText.of("whago_credits_on_campaign", text(f"""
WITH c AS (
    UPDATE campaigns SET credits_consumed_unfolded = credits_consumed_unfolded + :consumed,
                         credits_released_unfolded = credits_released_unfolded + :released
    WHERE id = :c AND state IN ({_UNFOLDED_STATES}) RETURNING 1
), t AS ({_ENTRIES.format(source="c")}
)
SELECT count(*) FROM c
"""))

_FOLD = text("""
WITH f AS (
    UPDATE campaigns c SET credits_consumed_unfolded = 0, credits_released_unfolded = 0 FROM campaigns o
    WHERE c.id = :c AND o.id = :c AND (o.credits_consumed_unfolded <> 0 OR o.credits_released_unfolded <> 0)
    RETURNING o.credits_consumed_unfolded AS consumed, o.credits_released_unfolded AS released
)
UPDATE users SET credits = credits + f.released, credits_reserved = credits_reserved - f.consumed - f.released
FROM f WHERE users.id = :u
""")


def _entry_params(entries: list[Entry]) -> dict[str, list[int] | list[str]]:
    return {"kinds": [int(e.kind) for e in entries], "amounts": [e.amount for e in entries],
            "descriptions": [e.description for e in entries]}


_NO_FLOOR = -(2**62)
# NO KEY UPDATE: ledger inserts of running campaigns' reports (their foreign key takes KEY SHARE on
# this row) go on meanwhile.
_LOCK_USER = text("SELECT 1 FROM users WHERE id = :u FOR NO KEY UPDATE")


def _lock_user(session: Session, user_id: uuid.UUID) -> None:
    """Lock the users row BEFORE a statement that reads the balance to guard a debit: a statement
    that waits for the row inside gets the row's newest version but keeps its older snapshot of the
    campaigns, and a fold committed meanwhile (campaign -> users row) would count twice."""
    session.execute(_LOCK_USER, {"u": user_id})


def _apply(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID | None, entries: list[Entry],
           floor: int = _NO_FLOOR) -> Balance | None:
    """Write `entries` and move the users row by their effect, if available stays >= floor (None:
    nothing written, because the user does not exist or the guard failed)."""
    if floor > _NO_FLOOR:
        _lock_user(session, user_id)
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
    row = session.execute(_APPLY, {"u": user_id, "c": campaign_id, "d_available": d_available,
                                   "d_reserved": d_reserved, "floor": floor, **_entry_params(entries)}).one_or_none()
    return None if row is None else Balance(int(row.credits), int(row.credits_reserved))


def _settle_reservations(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID, entries: list[Entry]) -> None:
    """CONSUME/RELEASE entries of a campaign's messages: on the campaign row while it runs (see the
    module's docstring), on the users row otherwise (e.g. a campaign completed in this transaction)."""
    consumed = sum(e.amount for e in entries if e.kind == CreditKind.CONSUME)
    released = sum(e.amount for e in entries if e.kind == CreditKind.RELEASE)
    if consumed + released != sum(e.amount for e in entries):
        raise ValueError("only CONSUME and RELEASE entries settle on a campaign")
    params = {"u": user_id, "c": campaign_id, "consumed": consumed, "released": released, **_entry_params(entries)}
    if not execute_prepared(session, _APPLY_ON_CAMPAIGN, params).scalar_one():
        _apply(session, user_id, campaign_id, entries)


def fold(session: Session, user_id: uuid.UUID, campaign_id: uuid.UUID) -> None:
    """Move what the campaign settled onto its user's row, as it leaves RUNNING/PAUSED (the caller
    holds the campaign row). No ledger row: its entries were written as its reports came."""
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
        have = balance(session, user_id, lock=True)
        charged = max(0, min(late_sent, have.available if have is not None else 0))
    if charged:
        note = f"{late_sent} message(s) reported sent after their credit was released"
        if charged < late_sent:
            note += f"; {late_sent - charged} not charged (no credits available)"
        _apply(session, user_id, campaign_id, [Entry(CreditKind.RESERVE, charged, note),
                                               Entry(CreditKind.CONSUME, charged, note)])
    entries: list[Entry] = []
    if sent:
        entries.append(Entry(CreditKind.CONSUME, sent, f"{sent} message(s) sent"))
    if failed + skipped:
        parts = [f"{n} {what}" for n, what in ((failed, "failed"), (skipped, "skipped")) if n]
        entries.append(Entry(CreditKind.RELEASE, failed + skipped, "message(s) not sent: " + ", ".join(parts)))
    if entries:
        _settle_reservations(session, user_id, campaign_id, entries)
    return Settlement(sent, failed + skipped, late_sent, charged)


_BALANCE = text(f"SELECT {_BALANCE_COLUMNS} FROM users u, {_UNFOLDED} WHERE u.id = :u")


def balance(session: Session, user_id: uuid.UUID, *, lock: bool = False) -> Balance | None:
    """`lock`: the users row stays locked until the transaction ends (a debit guarded by this read)."""
    if lock:
        _lock_user(session, user_id)
    row = session.execute(_BALANCE, {"u": user_id}).one_or_none()
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
