"""Message ids as WhatsApp engines make them: the sandbox plays the engine's side of a send."""

from __future__ import annotations

import secrets

# GOWS (whatsmeow) and NOWEB (Baileys) answer new-message-id with "3EB0" + 18 upper-case hex digits
# and send under the `id` a sendText carries; WEBJS and WPP ignore a chosen id and pick their own.
ENGINES_KEEPING_IDS = frozenset({"GOWS", "NOWEB"})


def new_message_id() -> str:
    return "3EB0" + secrets.token_hex(9).upper()
