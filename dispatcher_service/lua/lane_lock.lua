-- Take (or extend) a lane's lock for one slice. KEYS: lock, want; ARGV: owner, ttl_ms.
-- Returns 1 (held; the want flag is cleared) or 0 (another slice holds it: the want flag is set so
-- the holder re-enqueues the lane when it lets go).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('SET', KEYS[2], '1', 'EX', 3600)
return 0
