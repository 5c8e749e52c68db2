-- Fragment (included by lane_lock_renew and lane_lock_renew_many): lock_renew(lock, beats, owner, ttl_ms,
-- member) extends a held lane lock and records its expiry in the heartbeat zset `beats` (nil: none).
-- Returns false when the lock is not ours any more (expired, or taken over: the owner must stop).
local function lock_renew(lock, beats, owner, ttl, member)
  if redis.call('GET', lock) ~= owner then return false end
  redis.call('PEXPIRE', lock, ttl)
  if beats then
    local t = redis.call('TIME')
    redis.call('ZADD', beats, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ttl), member)
  end
  return true
end
