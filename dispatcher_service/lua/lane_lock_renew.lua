-- Extend a held lane lock. KEYS: lock; ARGV: owner, ttl_ms. Returns 1, or 0 if it is not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
