"""PostgreSQL array parameters sent as one array literal ('{"a","b"}') instead of psycopg2's
ARRAY['a','b'] expression.

Why: psycopg2 inlines a list as ARRAY[e1, e2, ...], so the server parses, analyses and
const-folds one expression per element on every call. The hot delivery statements carry hundreds
of elements (a report of 400 outcomes has five arrays). A literal is parsed once, by array_in,
when the CAST(:x AS type[]) is folded. Measured on a 400-row UPDATE with four such arrays:
~8.4 ms -> ~5.4 ms per statement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime


def _element(v: object) -> str:
    if v is None:
        return "NULL"
    s = v.isoformat() if isinstance(v, datetime) else str(v)
    # Quoted, with backslash and double quote escaped (array_in's rules): any text round-trips,
    # including '', 'NULL', commas, braces and whitespace.
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(values: Iterable[object]) -> str:
    """The array literal of `values` (str, int, UUID, datetime or None), for CAST(:p AS type[])."""
    vals = values if isinstance(values, list | tuple) else list(values)
    if not vals:
        return "{}"
    # Fast path, the common case on the delivery path (hex ids, empty reasons): strings only, none
    # with a character to escape, quoted with one join instead of a function call per element
    # (that call was ~a fifth of a 400-outcome report's Python).
    if all(type(v) is str for v in vals):
        plain = "".join(vals)  # type: ignore[arg-type]
        if '"' not in plain and "\\" not in plain:
            return '{"' + '","'.join(vals) + '"}'  # type: ignore[arg-type]
    return "{" + ",".join(_element(v) for v in vals) + "}"


def int_literal(values: Iterable[int]) -> str:
    """The same for integers only, without quoting (the commonest case: message ids)."""
    return "{" + ",".join(map(str, map(int, values))) + "}"


def timestamp_literal(values: Sequence[datetime | None]) -> str:
    """The same for timestamps (ISO 8601 needs no escaping), None as NULL."""
    return "{" + ",".join("NULL" if v is None else '"' + v.isoformat() + '"' for v in values) + "}"
