-- Fragment (included by the scripts that let a WAHA request leave): fence_ok(fence, lane, want).
-- `want` is the lane's run value, "run:<epoch>" or "run:<epoch>#<owner>": with an owner, the lane
-- hash's `owner` (written by lane_lock when a slice takes the lane) must still be it, so a slice
-- whose lane was taken over (its heartbeat stopped: crash, long pause, partition) is refused in
-- the very step that would let its request leave.
local function fence_ok(fence, lane, want)
  local run, owner = string.match(want, '^([^#]*)#(.+)$')
  if not run then return redis.call('GET', fence) == want end
  if redis.call('GET', fence) ~= run then return false end
  return redis.call('HGET', lane, 'owner') == owner
end
