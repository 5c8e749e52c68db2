"""Redis key layout of the dispatcher (all state lives here; see README section in the report).

whago:dispatch:{c}          hash  epoch, state, request (serialized StartDispatchRequest), updated
whago:fence:{c}             str   "run:{epoch}" while lanes may send, "stop:{epoch}" after Pause/Cancel
whago:inflight:{c}          zset  token -> expiry (unix s) of WAHA requests in flight for the campaign
whago:lane:{c}:{chip}       hash  state, sent, failed, next_send_time, last_error, epoch, job, owner (the
                                  lock token the fence lets send), lease_until + lease_owner (leases its
                                  owner may hold, and that owner's job id), reclaim (owners taken over and
                                  when their leases may be retaken: "<after> <job id>;...")
whago:lanelock:{c}:{chip}   str   owner token (job id + nonce) holding the lane (short TTL, heartbeat)
whago:lanewant:{c}:{chip}   str   "1" when a slice found the lane busy and wants a follow-up
whago:lanebeats:{queue}     zset  "{c}:{chip}" -> lock expiry (ms) of running lanes: the owners' heartbeats,
                                  scanned by takeover.py for lanes whose owner went silent
whago:jobs:{c}              set   arq job ids enqueued for the campaign (revoke/abort bookkeeping)
whago:jobseq:{c}:{chip}     int   INCR source of the slice number n in job ids
whago:pace:{chip}           hash  last (last reserved slot), last_actual (end of the last send), busy_until/
                                  busy_token (a send of the chip in flight)
whago:pacelog:{chip}        zset  reservation token -> slot time (rolling hour/day caps)
whago:warmup:{chip}        hash  done (sending days over), d:<day> (sends/reservations of a warm-up day); chip
                                  warm-up (lua/warmup.lua); read by campaign_service's GetChip (warmup.py)
whago:wake:{queue}          channel  published when a job is enqueued to start now: workers poll at once
whago:reply:{chip}:{id}     str   set just before an opt-out confirmation reply is sent (at most once)
"""

from __future__ import annotations

PREFIX = "whago"


def dispatch(c: str) -> str:
    return f"{PREFIX}:dispatch:{c}"


def fence(c: str) -> str:
    return f"{PREFIX}:fence:{c}"


def inflight(c: str) -> str:
    return f"{PREFIX}:inflight:{c}"


def lane(c: str, chip: str) -> str:
    return f"{PREFIX}:lane:{c}:{chip}"


def lane_lock(c: str, chip: str) -> str:
    return f"{PREFIX}:lanelock:{c}:{chip}"


def lane_want(c: str, chip: str) -> str:
    return f"{PREFIX}:lanewant:{c}:{chip}"


def lane_beats(queue: str) -> str:
    return f"{PREFIX}:lanebeats:{queue}"


def jobs(c: str) -> str:
    return f"{PREFIX}:jobs:{c}"


def job_seq(c: str, chip: str) -> str:
    return f"{PREFIX}:jobseq:{c}:{chip}"


def pace(chip: str) -> str:
    return f"{PREFIX}:pace:{chip}"


def pace_log(chip: str) -> str:
    return f"{PREFIX}:pacelog:{chip}"


def warmup(chip: str) -> str:
    return f"{PREFIX}:warmup:{chip}"


def wake(queue: str) -> str:
    return f"{PREFIX}:wake:{queue}"


def job_id(c: str, chip: str, epoch: int, n: int) -> str:
    """arq job id of one lane slice; never reused (n comes from INCR)."""
    return f"lane:{c}:{chip}:{epoch}:{n}"


def reply_job(chip: str, reply_id: str) -> str:
    """arq job id of an opt-out confirmation reply: one per opt-out (arq refuses a second enqueue)."""
    return f"reply:{chip}:{reply_id}"


def reply_sent(chip: str, reply_id: str) -> str:
    return f"{PREFIX}:reply:{chip}:{reply_id}"
