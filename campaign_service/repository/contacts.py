"""Campaign contacts. Imports go through COPY into a temp table and one INSERT ... SELECT ... ON
CONFLICT DO NOTHING, so a 1M-row import is a handful of statements."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from campaign_service.db.models import Contact

_TEMP = "whago_import"
# COPY text format escapes; NUL cannot be stored in PostgreSQL text, so it is dropped.
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": ""})


def _raw_connection(session: Session) -> Any:
    """The psycopg2 connection under the session's transaction (for copy_expert)."""
    return session.connection().connection.dbapi_connection


def begin_import(session: Session) -> None:
    """A temp table for this transaction's staged rows (dropped at commit)."""
    session.execute(text(
        f"CREATE TEMP TABLE IF NOT EXISTS {_TEMP} (phone text, chat_id text, name text, variables jsonb,"
        " row_no bigint) ON COMMIT DROP"))
    session.execute(text(f"TRUNCATE {_TEMP}"))


def _no_nul(variables: Mapping[str, str]) -> dict[str, str]:
    """jsonb rejects \\u0000: drop NUL characters from template variables."""
    return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in variables.items()}


Row = tuple[str, str, str, Mapping[str, str], int]


def copy_text(rows: Iterable[Row], prefix: str) -> tuple[str, int]:
    """COPY text format of (phone, chat_id, name, variables, row_no) rows, each line starting with
    `prefix` (tabs, newlines and backslashes escaped); and the number of rows."""
    parts: list[str] = []
    add = parts.append
    dumps = json.dumps
    for phone, chat, name, variables, row_no in rows:
        v = dumps(_no_nul(variables), ensure_ascii=False).translate(_ESCAPES) if variables else "{}"
        add(f"{prefix}{phone}\t{chat}\t{name.translate(_ESCAPES)}\t{v}\t{row_no}\n")
    return "".join(parts), len(parts)


class _Abort(Exception):
    """Raised inside COPY's read() to make psycopg2 abort the COPY."""


class CopyStream:
    """One COPY of the import's rows, running in a helper thread while the caller keeps normalizing:
    psycopg2 releases the GIL while it sends data and while PostgreSQL works, so the import costs
    about max(Python, PostgreSQL) instead of their sum. The caller must not use the session until
    `finish()` (or `abort()`) returns.

    `direct`: straight into campaign_contacts (a campaign without contacts whose row the caller holds
    locked, rows already deduplicated: nothing can conflict); otherwise into the temp table of
    `begin_import`."""

    def __init__(self, session: Session, campaign_id: uuid.UUID, direct: bool, depth: int = 4) -> None:
        if direct:
            self._sql = ("COPY campaign_contacts (campaign_id, phone, chat_id, name, variables, row_no)"
                         " FROM STDIN")
            self._prefix = f"{campaign_id}\t"
        else:
            self._sql = f"COPY {_TEMP} (phone, chat_id, name, variables, row_no) FROM STDIN"
            self._prefix = ""
        self._session = session
        self._queue: queue.Queue[str | _Abort | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.rows = 0

    def read(self, size: int = -1) -> str:
        """psycopg2's side: the next piece of COPY text ('' ends the COPY)."""
        item = self._queue.get()
        if isinstance(item, _Abort):
            raise item
        return item or ""

    def _run(self, cursor: Any) -> None:
        try:
            cursor.copy_expert(self._sql, self, size=1 << 16)
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
        finally:
            cursor.close()

    def send(self, rows: list[Row]) -> None:
        """Queue rows for the COPY (blocks while PostgreSQL is behind)."""
        text_, n = copy_text(rows, self._prefix)
        if not n:
            return
        if self._thread is None:
            cursor = _raw_connection(self._session).cursor()
            self._thread = threading.Thread(target=self._run, args=(cursor,), name="import-copy", daemon=True)
            self._thread.start()
        self._put(text_)
        self.rows += n

    def _put(self, item: str | _Abort | None) -> None:
        assert self._thread is not None
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or RuntimeError("COPY ended early") from None

    def finish(self) -> int:
        """End the COPY and wait for it; raises its error if it failed. Returns the rows sent."""
        if self._thread is not None:
            self._put(None)
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
        return self.rows

    def abort(self) -> None:
        """Cancel the COPY (the caller failed); the transaction must then roll back."""
        if self._thread is None:
            return
        while True:  # only this thread puts: once drained, there is room for the abort
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put_nowait(_Abort("import aborted"))
        self._thread.join()
        self._thread = None


def finish_import(session: Session, campaign_id: uuid.UUID) -> int:
    """Move the staged rows into campaign_contacts; rows whose phone exists are merged (skipped).
    Returns the number of new contacts."""
    result = session.execute(text(
        f"INSERT INTO campaign_contacts (campaign_id, phone, chat_id, name, variables, row_no)"
        f" SELECT :c, phone, chat_id, name, variables, row_no FROM {_TEMP} ORDER BY row_no"
        f" ON CONFLICT (campaign_id, phone) DO NOTHING"), {"c": campaign_id})
    return int(result.rowcount)  # type: ignore[attr-defined]


def max_row_no(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("SELECT coalesce(max(row_no), 0) FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).scalar_one())


def count(session: Session, campaign_id: uuid.UUID) -> int:
    return int(session.execute(text("SELECT count(*) FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).scalar_one())


def page(session: Session, campaign_id: uuid.UUID, limit: int, after_id: int) -> list[Contact]:
    return list(session.execute(
        select(Contact).where(Contact.campaign_id == campaign_id, Contact.id > after_id)
        .order_by(Contact.id).limit(limit)).scalars())


def delete_all(session: Session, campaign_id: uuid.UUID) -> int:
    """One statement for all of the campaign's contacts."""
    return int(session.execute(text("DELETE FROM campaign_contacts WHERE campaign_id = :c"),
                               {"c": campaign_id}).rowcount)  # type: ignore[attr-defined]


def missing_values(session: Session, campaign_id: uuid.UUID, names: Sequence[str]) -> dict[str, int]:
    """How many of the campaign's contacts have no value for each variable (one scan for all).
    name/first_name come from the contact's name, or a `name` column."""
    if not names:
        return {}
    exprs: list[str] = []
    params: dict[str, Any] = {"c": campaign_id}
    for k, n in enumerate(names):
        if n in ("name", "first_name"):
            cond = "name = '' AND coalesce(variables->>'name', '') = ''"
        else:
            cond = f"coalesce(variables->>:k{k}, '') = ''"
            params[f"k{k}"] = n
        exprs.append(f"count(*) FILTER (WHERE {cond})")
    row = session.execute(text(f"SELECT {', '.join(exprs)} FROM campaign_contacts WHERE campaign_id = :c"),
                          params).one()
    return {n: int(row[k]) for k, n in enumerate(names)}
