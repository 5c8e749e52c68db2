"""A user's credits: the balance and the ledger (read-only here; the ledger is written by Start,
Cancel, delivery reports and the admin CLI, all through repository/credits.py)."""

from __future__ import annotations

import uuid

from campaign_service import errors, pagination
from campaign_service.ids import parse_uuid
from campaign_service.ops.base import OpsBase
from campaign_service.ops.inputs import Page
from campaign_service.repository import credits as credits_repo
from campaign_service.repository.credits import Balance
from campaign_service.states import CreditKind

_LIST = "credit_transactions"


class CreditOps(OpsBase):
    """GetCreditBalance, ListCreditTransactions."""

    def get_balance(self, user_id: uuid.UUID) -> Balance:
        with self.db.session() as s:
            b = credits_repo.balance(s, user_id)
        if b is None:  # authenticated, so the user existed a moment ago
            raise errors.NotFound("user", str(user_id))
        return b

    def list_transactions(self, user_id: uuid.UUID, page_size: int, page_token: str, campaign_id: str = "",
                          kind: int = 0) -> Page:
        """Newest first; optionally one campaign's entries, or one kind's. Keyset on the entry id."""
        size = pagination.page_size(page_size)
        cid = parse_uuid(campaign_id, "campaign_id") if campaign_id else None
        if kind not in {int(k) for k in CreditKind}:
            raise errors.InvalidArgument([("kind", f"not a CreditTransactionKind: {kind}")])
        filter_ = f"{cid or ''}|{kind}"
        cursor = pagination.decode(page_token, _LIST, filter_)
        before: int | None = None
        if cursor is not None:
            if len(cursor) != 1 or not isinstance(cursor[0], int) or isinstance(cursor[0], bool):
                raise errors.InvalidArgument([("page_token", "malformed page token")])
            before = cursor[0]
        with self.db.session() as s:
            rows = credits_repo.page(s, user_id, size + 1, before, cid, kind)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode(_LIST, filter_, [rows[-1].id])
        return Page(rows, token)
