"""PostgreSQL text cannot hold NUL (U+0000), and protobuf strings can: a request carrying one in
any string field is refused as INVALID_ARGUMENT naming that field, before any handler runs (rather
than failing at the database as an internal error, half-way through a write)."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_STRING, _MESSAGE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE


def first_nul_field(msg: Message, prefix: str = "") -> str | None:
    """The path of the first string (also in repeated fields, maps and nested messages) holding a
    NUL character, as the error names it ("campaign.templates[1].text"); None when there is none."""
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
