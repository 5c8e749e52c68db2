-- Take (or extend) a lane's lock for one slice. KEYS: lock, want[, lane, beats]; ARGV: owner, ttl_ms[, member].
-- Returns 1 (held; the want flag is cleared) or 0 (another slice holds it: the want flag is set so
-- the holder re-enqueues the lane when it lets go).
-- With lane and beats (takeover): a fresh lock writes `owner` into the lane hash (fence_ok refuses
-- any other slice's request from then on, a stale owner's included) and the lock's expiry into the
-- heartbeat zset (member -> expiry ms), where supervisors look for lanes whose owner went silent.
local function beat()
  if #KEYS >= 4 then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]), ARGV[3])
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  if #KEYS >= 3 then redis.call('HSET', KEYS[3], 'owner', ARGV[1]) end
  beat()
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if #KEYS >= 3 then redis.call('HSET', KEYS[3], 'owner', ARGV[1]) end
  beat()
  return 1
end
redis.call('SET', KEYS[2], '1', 'EX', 3600)
return 0
