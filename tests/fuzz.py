"""Hypothesis strategies generated from protobuf descriptors, for fuzzing the public API: any message
of any RPC, with adversarial values (control characters, invalid UTF-8 through bytes fields, very
long and empty strings, extreme numbers, unknown enum values, tampered page tokens, unknown field
mask paths, large repeated fields), and now and then the id of a real resource so calls get past
the first lookup."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = d.FieldDescriptor
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
MAX_DEPTH = 3

_nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=8),
    st.sampled_from(["", " ", "\x00", "\u202e", "../../etc/passwd", "'; DROP TABLE campaigns; --", "{{name}}",
                     "{a|", "%s%n", "\ud7ff", "https://169.254.169.254/", "http://127.0.0.1:1/",
                     "00000000-0000-0000-0000-000000000000", "not-a-uuid", "+55 11 99999-0000"]),
    st.text(min_size=1, max_size=3).map(lambda s: s * 3000),  # long
)


def page_tokens() -> st.SearchStrategy[str]:
    """Garbage, truncated and tampered tokens (valid base64 of JSON with the wrong kind or cursor)."""
    def tok(doc: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
    return st.one_of(
        _nasty_text,
        st.builds(lambda k, c: tok({"k": k, "f": "", "c": c}),
                  st.sampled_from(["campaigns", "chips", "contacts", "messages", "audit", "webhooks", "x"]),
                  st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3)),
        st.builds(lambda x: tok(x), st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers()))),
    )


def _scalar(f: FD, ids: Sequence[str]) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FD.TYPE_STRING:
        if f.name == "page_token":
            return page_tokens()
        if f.name.endswith("_id") or f.name == "id" or f.name.endswith("_ids"):
            return st.one_of(st.sampled_from(list(ids) or [""]), _nasty_text)
        return _nasty_text
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"\xff\xfe\xfd", b"\x89PNG\r\n\x1a\n", b""]))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(st.integers(*INT32), st.sampled_from([0, -1, 1, 1000, 1001, INT32[0], INT32[1]]))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.one_of(st.integers(*INT64), st.sampled_from([0, -1, 1, INT64[0], INT64[1]]))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(*UINT32)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(*UINT64)
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == FD.TYPE_FLOAT else 64)
    if t == FD.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))  # unknown values too (open enums)
    raise TypeError(f"unhandled field type {t} ({f.full_name})")


def messages(desc: d.Descriptor, ids: Sequence[str] = (), depth: int = 0) -> st.SearchStrategy[Message]:
    """A strategy for messages of `desc`: every field set or not, at random."""
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.FieldMask":
        return st.builds(lambda paths: field_mask_pb2.FieldMask(paths=paths),
                         st.lists(st.one_of(st.sampled_from(["name", "description", "templates", "settings",
                                                             "settings.pacing", "chip_ids", "schedule_time",
                                                             "url", "enabled", "event_types", "id", "state"]),
                                            _nasty_text), max_size=4))
    if desc.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), st.integers(-62135596800, 253402300799),
                         st.integers(0, 999_999_999))
    if desc.full_name == "google.protobuf.Duration":
        return st.builds(lambda s: cls(seconds=s), st.integers(-315576000000, 315576000000))
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if value.message_type is not None:
                continue
            fields[f.name] = st.dictionaries(_scalar(key, ids), _scalar(value, ids), max_size=4)
            continue
        if f.message_type is not None:
            if depth >= MAX_DEPTH:
                continue
            inner = messages(f.message_type, ids, depth + 1)
            fields[f.name] = st.lists(inner, max_size=3) if _repeated(f) else inner
        else:
            inner = _scalar(f, ids)
            fields[f.name] = st.one_of(st.lists(inner, max_size=4), st.lists(inner, min_size=200, max_size=300)
                                       ) if _repeated(f) and depth == 0 else (
                st.lists(inner, max_size=4) if _repeated(f) else inner)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for name, strat in fields.items():
            if not draw(st.booleans()):
                continue
            value = draw(strat)
            f = desc.fields_by_name[name]
            try:
                if f.message_type is not None and f.message_type.GetOptions().map_entry:
                    getattr(msg, name).update(value)
                elif _repeated(f):
                    if f.message_type is not None:
                        getattr(msg, name).extend(value)
                    else:
                        getattr(msg, name).extend(value)
                elif f.message_type is not None:
                    getattr(msg, name).CopyFrom(value)
                else:
                    setattr(msg, name, value)
            except (ValueError, TypeError):
                pass  # a value protobuf itself refuses to hold (e.g. a surrogate in a string): leave it unset
        return msg

    return build()


def _repeated(f: FD) -> bool:
    return bool(f.is_repeated)
