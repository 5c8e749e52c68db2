"""A user's suppression list and opt-out settings (SuppressionService), and the opt-out word
matching the inbound path (delivery/inbound.py) uses."""

from __future__ import annotations

import csv
import io
import logging
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from campaign_service import audit, errors, pagination, phones
from campaign_service.ops.base import OpsBase
from campaign_service.repository import suppressions as repo

log = logging.getLogger("campaign_service.suppressions")

MAX_NOTE = 500
MAX_WORDS = 50
MAX_WORD = 40
MAX_CONFIRMATION = 1000
MAX_IMPORT_ROWS = 100_000
MAX_IMPORT_BYTES = 16 * 1024 * 1024
PHONE_COLUMNS = ("phone", "telefone", "numero", "número", "number", "celular", "whatsapp")
NOTE_COLUMNS = ("note", "nota", "observacao", "observação", "notes")
_SPACES = re.compile(r"\s+")
# Surrounding marks people add to a one-word reply ("Sair.", "STOP!").
_EDGE_MARKS = ".!?¡¿,;:\"'()[]*-_~"


def normalize_word(text: str) -> str:
    """How opt-out words and inbound texts are compared: accents removed (NFKD without combining
    marks), case folded, trimmed (whitespace and surrounding punctuation), inner spaces collapsed."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SPACES.sub(" ", plain.casefold().strip().strip(_EDGE_MARKS).strip())


def is_opt_out(text: str, words: Iterable[str]) -> bool:
    t = normalize_word(text)
    return bool(t) and any(t == normalize_word(w) for w in words)


@dataclass(frozen=True)
class ImportResult:
    added: int
    already: int
    total_rows: int


class SuppressionOps(OpsBase):
    """Add/List/Remove/ImportSuppressions, Get/UpdateOptOutSettings."""

    def _phone(self, raw: str, field: str) -> str:
        got = phones.normalize(raw, self.settings.default_region)
        if isinstance(got, str):
            raise errors.InvalidArgument([(field, f"{got}: {raw[:64]!r}")])
        return got.digits

    @staticmethod
    def _note(note: str, field: str) -> str:
        if len(note) > MAX_NOTE:
            raise errors.InvalidArgument([(field, f"at most {MAX_NOTE} characters")])
        return note.strip()

    def add(self, user_id: uuid.UUID, phone: str, note: str) -> repo.SuppressionRow:
        digits = self._phone(phone, "phone")
        note = self._note(note, "note")
        with self.db.transaction() as s:
            row, created = repo.add(s, user_id, digits, repo.MANUAL, note)
            if created:
                audit.record(s, user_id=user_id, action="suppression.add", entity_type="suppression",
                             entity_id=digits, description=f"{digits} added to the suppression list.",
                             extra_data={"phone": digits})
        return row

    def remove(self, user_id: uuid.UUID, phone: str) -> None:
        digits = self._phone(phone, "phone")
        with self.db.transaction() as s:
            if not repo.remove(s, user_id, digits):
                raise errors.NotFound("suppression", digits)
            audit.record(s, user_id=user_id, action="suppression.remove", entity_type="suppression",
                         entity_id=digits, description=f"{digits} removed from the suppression list.",
                         extra_data={"phone": digits})

    def list(self, user_id: uuid.UUID, page_size: int, page_token: str, query: str, source: int
             ) -> tuple[list[repo.SuppressionRow], str]:
        size = pagination.page_size(page_size)
        digits = "".join(ch for ch in query if ch.isdigit())
        if query.strip() and not digits:
            raise errors.InvalidArgument([("query", "search by the digits of a phone number")])
        if source not in (0, repo.MANUAL, repo.IMPORT, repo.OPT_OUT):
            raise errors.InvalidArgument([("source", "unknown source")])
        filt = f"{digits}|{source}"
        cursor = pagination.decode(page_token, "suppressions", filt)
        after = str(cursor[0]) if cursor else None
        with self.db.session() as s:
            rows = repo.page(s, user_id, digits, source, size + 1, after)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode("suppressions", filt, [rows[-1].phone])
        return rows, token

    def import_rows(self, user_id: uuid.UUID, csv_content: bytes, rows: Sequence[tuple[str, str]]
                    ) -> ImportResult:
        """All rows are validated before anything is written; one transaction."""
        if len(csv_content) > MAX_IMPORT_BYTES:
            raise errors.InvalidArgument([("csv_content", f"at most {MAX_IMPORT_BYTES} bytes")])
        parsed: list[tuple[str, str, str]] = []  # (field naming the row, phone, note)
        if csv_content:
            parsed += _csv_rows(csv_content)
        parsed += [(f"rows[{i}]", p, n) for i, (p, n) in enumerate(rows)]
        if len(parsed) > MAX_IMPORT_ROWS:
            raise errors.InvalidArgument([("rows", f"at most {MAX_IMPORT_ROWS} rows per import")])
        violations: list[tuple[str, str]] = []
        good: dict[str, str] = {}
        for where, raw, note in parsed:
            got = phones.normalize(raw, self.settings.default_region)
            if isinstance(got, str):
                violations.append((f"{where}.phone", f"{got}: {raw[:64]!r}"))
            elif len(note) > MAX_NOTE:
                violations.append((f"{where}.note", f"at most {MAX_NOTE} characters"))
            else:
                good.setdefault(got.digits, note.strip())
            if len(violations) >= 20:
                break
        if violations:
            raise errors.InvalidArgument(violations, f"{len(violations)} malformed row(s), e.g. {violations[0][0]}: "
                                         f"{violations[0][1]}; nothing was imported")
        with self.db.transaction() as s:
            added = repo.add_many(s, user_id, list(good.items()), repo.IMPORT)
            audit.record(s, user_id=user_id, action="suppression.import", entity_type="suppression", entity_id="",
                         description=f"{added} number(s) added to the suppression list by import.",
                         extra_data={"rows": len(parsed), "added": added}, actor=f"user:{user_id}")
        log.info("user=%s suppression import: %d rows, %d added", user_id, len(parsed), added)
        return ImportResult(added, len(parsed) - added, len(parsed))

    def get_settings(self, user_id: uuid.UUID) -> repo.OptOutSettingsRow:
        with self.db.session() as s:
            return repo.settings(s, user_id)

    def update_settings(self, user_id: uuid.UUID, words: Sequence[str] | None, confirmation_text: str | None
                        ) -> repo.OptOutSettingsRow:
        v: list[tuple[str, str]] = []
        clean: list[str] | None = None
        if words is not None:
            clean = []
            for i, w in enumerate(words):
                if not normalize_word(w):
                    v.append((f"settings.words[{i}]", "empty word"))
                elif len(w.strip()) > MAX_WORD:
                    v.append((f"settings.words[{i}]", f"at most {MAX_WORD} characters"))
                elif normalize_word(w) not in {normalize_word(c) for c in clean}:
                    clean.append(w.strip())
            if not words:
                v.append(("settings.words", "at least one word (an empty list would silence every opt-out)"))
            elif len(words) > MAX_WORDS:
                v.append(("settings.words", f"at most {MAX_WORDS} words"))
        if confirmation_text is not None and len(confirmation_text) > MAX_CONFIRMATION:
            v.append(("settings.confirmation_text", f"at most {MAX_CONFIRMATION} characters"))
        if v:
            raise errors.InvalidArgument(v)
        with self.db.transaction() as s:
            cur = repo.settings(s, user_id)
            out = repo.save_settings(s, user_id, clean if clean is not None else cur.words,
                                     confirmation_text.strip() if confirmation_text is not None
                                     else cur.confirmation_text)
            audit.record(s, user_id=user_id, action="suppression.settings", entity_type="opt_out_settings",
                         entity_id=str(user_id), description="Opt-out settings updated.",
                         extra_data={"words": out.words, "confirmation_text": out.confirmation_text})
        return out


def _csv_rows(content: bytes) -> list[tuple[str, str, str]]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise errors.InvalidArgument([("csv_content", f"not UTF-8 (byte {e.start})")]) from None
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        lines = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as e:
        raise errors.InvalidArgument([("csv_content", f"malformed CSV: {e}")]) from None
    phone_col, note_col, start = 0, -1, 0
    numbered = [(i + 1, row) for i, row in enumerate(lines) if any(c.strip() for c in row)]
    if numbered:
        header = [c.strip().casefold() for c in numbered[0][1]]
        if not any(ch.isdigit() for ch in "".join(header)):  # a header row: no digits in it
            start = 1
            phone_col = next((i for i, h in enumerate(header) if h in PHONE_COLUMNS), 0)
            note_col = next((i for i, h in enumerate(header) if h in NOTE_COLUMNS), -1)
    out: list[tuple[str, str, str]] = []
    for line_no, row in numbered[start:]:
        phone = row[phone_col] if phone_col < len(row) else ""
        note = row[note_col] if 0 <= note_col < len(row) else ""
        out.append((f"csv_content line {line_no}", phone, note))
    return out
