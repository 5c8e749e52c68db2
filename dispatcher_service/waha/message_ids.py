"""WhatsApp message ids chosen by the sender, in the shape WAHA's engines give them.

On WhatsApp the sending client picks a message's id. WAHA's GET /api/{session}/new-message-id only
runs its engine's generator and keeps no record of what it handed out: GOWS (whatsmeow) and NOWEB
(Baileys) both answer "3EB0" followed by 18 upper-case hex digits (9 bytes of a hash over random
bytes). An id made here has the same shape and the same 72 bits of randomness, costs no WAHA
request, and serves at-most-once exactly as WAHA's would: chosen and recorded before the send, sent
in sendText's `id`, looked up by it when the outcome is uncertain.
"""

from __future__ import annotations

import re
import secrets

PREFIX = "3EB0"
PATTERN = re.compile(r"3EB0[0-9A-F]{18}")
# Engines whose sendText takes the `id` it is given (GOWS, NOWEB). Others (WEBJS) send under an id
# of their own: a lookup by the id we chose then finds nothing, so it proves nothing.
ENGINES_KEEPING_IDS = frozenset({"GOWS", "NOWEB"})


def new_message_id() -> str:
    """A fresh id: "3EB0" + 9 random bytes in upper-case hex (22 characters)."""
    return PREFIX + secrets.token_hex(9).upper()


def new_message_ids(n: int) -> list[str]:
    """n fresh ids from one read of the OS's random source (a lane takes a batch's ids at once;
    one urandom call per id was a syscall per message)."""
    raw = secrets.token_bytes(9 * n)
    return [PREFIX + raw[i:i + 9].hex().upper() for i in range(0, 9 * n, 9)]
