-- Give back a slot: forget it for the caps; if nobody reserved after it, roll `last` back so the
-- next reservation draws a fresh random gap from the previous send instead of drifting.
-- KEYS: pace, pacelog; ARGV: token.
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'last_token') == ARGV[1] then
  local prev = redis.call('HGET', KEYS[1], 'last_prev')
  if prev then redis.call('HSET', KEYS[1], 'last', prev) end
  redis.call('HDEL', KEYS[1], 'last_token', 'last_prev')
end
return 1
