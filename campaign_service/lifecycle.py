"""The campaign lifecycle table of DESIGN.md as pure data and one check function.

Every state change goes through `check`, so a refusal always carries the same ErrorInfo
(reason INVALID_STATE_TRANSITION, metadata current_state/operation/allowed_states)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from campaign_service import errors
from campaign_service.states import CampaignState as State

INVALID_STATE_TRANSITION = "INVALID_STATE_TRANSITION"
DELETE_REFUSED_MESSAGE = "cancel the campaign before deleting it"


class Op(StrEnum):
    UPDATE = "update"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    DELETE = "delete"
    IMPORT = "import contacts into"
    UPLOAD_MEDIA = "upload media to"
    DELETE_MEDIA = "delete media from"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[State]
    # None: the state is kept (Update, Import, UploadMedia) or the campaign disappears (Delete).
    result: State | None


EDITABLE = frozenset({State.DRAFT, State.SCHEDULED})

RULES: dict[Op, Rule] = {
    Op.UPDATE: Rule(EDITABLE, None),
    Op.IMPORT: Rule(EDITABLE, None),
    Op.UPLOAD_MEDIA: Rule(EDITABLE, None),
    Op.DELETE_MEDIA: Rule(EDITABLE, None),
    Op.START: Rule(EDITABLE, State.RUNNING),
    Op.PAUSE: Rule(frozenset({State.RUNNING}), State.PAUSED),
    Op.RESUME: Rule(frozenset({State.PAUSED}), State.RUNNING),
    Op.CANCEL: Rule(frozenset({State.SCHEDULED, State.RUNNING, State.PAUSED}), State.CANCELLED),
    Op.DELETE: Rule(frozenset({State.DRAFT, State.CANCELLED, State.COMPLETED}), None),
    Op.COMPLETE: Rule(frozenset({State.RUNNING}), State.COMPLETED),
}


def allowed(op: Op, state: int) -> bool:
    return State(state) in RULES[op].allowed


def refusal(op: Op, state: int) -> errors.FailedPrecondition:
    """The FAILED_PRECONDITION for `op` from `state` (the seed's message for Delete)."""
    st = State(state)
    rule = RULES[op]
    names = ", ".join(s.name for s in sorted(rule.allowed))
    if op is Op.DELETE and st in (State.RUNNING, State.PAUSED, State.SCHEDULED):
        message = f"{DELETE_REFUSED_MESSAGE} (state {st.name})"
    else:
        message = f"cannot {op.value} a campaign in state {st.name}; allowed from {names}"
    return errors.FailedPrecondition(INVALID_STATE_TRANSITION, message, {
        "current_state": st.proto_name, "operation": op.name, "allowed_states": names})


def check(op: Op, state: int) -> State | None:
    """Raise the refusal unless `op` is allowed from `state`; return the resulting state (None: unchanged
    or deleted)."""
    if not allowed(op, state):
        raise refusal(op, state)
    return RULES[op].result


def state_after_schedule(state: int, has_schedule: bool) -> State:
    """Setting/clearing schedule_time moves an editable campaign DRAFT <-> SCHEDULED."""
    st = State(state)
    if st in EDITABLE:
        return State.SCHEDULED if has_schedule else State.DRAFT
    return st
