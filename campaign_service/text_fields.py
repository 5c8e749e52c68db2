"""PostgreSQL text cannot hold NUL (U+0000), and protobuf strings can: a request carrying one in
any string field is refused as INVALID_ARGUMENT naming that field, before any handler runs (rather
than failing at the database as an internal error, half-way through a write)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_STRING, _MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


@dataclass(frozen=True)
class _Plan:
    """Where a message type can hold strings: its string fields, and its message fields whose
    types can (a Timestamp cannot: never visited)."""

    strings: tuple[str, ...]
    repeated_strings: tuple[str, ...]
    messages: tuple[tuple[str, str, Descriptor], ...]  # (name, "one" | "many" | "map", type)


@functools.cache
def _plan(desc: Descriptor) -> _Plan:
    strings: list[str] = []
    repeated: list[str] = []
    messages: list[tuple[str, str, Descriptor]] = []
    for fd in desc.fields:
        if fd.type == _STRING:
            (repeated if fd.is_repeated else strings).append(fd.name)
        elif fd.type == _MESSAGE and fd.message_type is not None and _can_hold_strings(fd.message_type):
            kind = "map" if fd.message_type.GetOptions().map_entry else "many" if fd.is_repeated else "one"
            messages.append((fd.name, kind, fd.message_type))
    return _Plan(tuple(strings), tuple(repeated), tuple(messages))


@functools.cache
def _can_hold_strings(desc: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if desc.full_name in seen:
        return True  # recursive type (Struct, Value): assume it can
    inner = seen | {desc.full_name}
    return any(fd.type == _STRING or (fd.type == _MESSAGE and fd.message_type is not None
                                      and _can_hold_strings(fd.message_type, inner)) for fd in desc.fields)


def _has_nul(msg: Message) -> bool:
    """Whether any string of `msg` holds a NUL: the quick test every request takes (first_nul_field's
    walk of ListFields per nested message was ~9% of the campaign service's Python time under the
    `dispatch` figure: a report of hundreds of outcomes is hundreds of messages)."""
    plan = _plan(msg.DESCRIPTOR)
    for name in plan.strings:
        if "\x00" in getattr(msg, name):
            return True
    for name in plan.repeated_strings:
        if "\x00" in "".join(getattr(msg, name)):
            return True
    for name, kind, _ in plan.messages:
        if kind == "one":
            if msg.HasField(name) and _has_nul(getattr(msg, name)):
                return True
        elif kind == "many":
            if any(_has_nul(m) for m in getattr(msg, name)):
                return True
        else:
            for k, v in getattr(msg, name).items():
                if (isinstance(k, str) and "\x00" in k) or (isinstance(v, str) and "\x00" in v) or (
                        isinstance(v, Message) and _has_nul(v)):
                    return True
    return False


def first_nul_field(msg: Message, prefix: str = "") -> str | None:
    """The path of the first string (also in repeated fields, maps and nested messages) holding a
    NUL character, as the error names it ("campaign.templates[1].text"); None when there is none."""
    if not prefix and not _has_nul(msg):
        return None
    for fd, value in msg.ListFields():
        name = prefix + fd.name
        if fd.type == _STRING:
            if fd.is_repeated:
                for i, s in enumerate(value):
                    if "\x00" in s:
                        return f"{name}[{i}]"
            elif "\x00" in value:
                return name
        elif fd.type == _MESSAGE:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    key = f"{name}[{k!r}]" if isinstance(k, str) else f"{name}[{k}]"
                    if isinstance(k, str) and "\x00" in k:
                        return name
                    if isinstance(v, str) and "\x00" in v:
                        return key
                    if isinstance(v, Message) and (found := first_nul_field(v, key + ".")) is not None:
                        return found
            elif fd.is_repeated:
                for i, m in enumerate(value):
                    if (found := first_nul_field(m, f"{name}[{i}].")) is not None:
                        return found
            elif (found := first_nul_field(value, name + ".")) is not None:
                return found
    return None
