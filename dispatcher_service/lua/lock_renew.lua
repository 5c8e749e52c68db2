-- Fragment (included by lane_lock_renew and lane_lock_renew_many): lock_renew(lock, beats, owner, ttl_ms,
-- member, lane) extends a held lane lock and records its expiry in the heartbeat zset `beats` (nil: none).
-- With `lane` (the lane hash), a lock that lapsed while its owner's process was too busy to beat in
-- time is taken back when nobody took the lane over meanwhile (the hash still names the owner: no
-- other slice has taken the lock, so none could send; a takeover slice enqueued on the lapse then
-- finds the lane busy and leaves it).
-- Returns false when the lock is not ours any more (taken over, or expired without `lane`: the owner must stop).
-- The heartbeat zset's score of a lane beating now: when its lock lapses (Redis TIME, ms, + ttl).
local function beat_expiry(ttl)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ttl)
end

local function lock_renew(lock, beats, owner, ttl, member, lane)
  local held = redis.call('GET', lock)
  if held == owner then
    redis.call('PEXPIRE', lock, ttl)
  elseif not held and lane and redis.call('HGET', lane, 'owner') == owner then
    redis.call('SET', lock, owner, 'PX', ttl)
  else
    return false
  end
  if beats then
    redis.call('ZADD', beats, beat_expiry(ttl), member)
  end
  return true
end
