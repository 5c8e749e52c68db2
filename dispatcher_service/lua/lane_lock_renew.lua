-- Extend a held lane lock (the owner's heartbeat). KEYS: lock[, beats]; ARGV: owner, ttl_ms[, member].
-- Returns 1, or 0 if it is not ours (expired, or taken over: the owner must stop).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if #KEYS >= 2 then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]), ARGV[3])
  end
  return 1
end
return 0
