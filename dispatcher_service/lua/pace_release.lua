-- Give back a slot: forget it for the caps; if nobody reserved after it, roll `last` back so the
-- next reservation draws a fresh random gap from the previous send instead of drifting.
-- KEYS: pace, pacelog[, warm]; ARGV: token[, day_seconds]. With the chip's warm-up hash, the slot
-- no longer counts for its warm-up day either (a day whose reservations were all released is no
-- sending day).
if #KEYS >= 3 and ARGV[2] then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if score then
    local f = 'd:' .. string.format('%d', math.floor(tonumber(score) / tonumber(ARGV[2])))
    if tonumber(redis.call('HGET', KEYS[3], f) or '0') > 0 then redis.call('HINCRBY', KEYS[3], f, -1) end
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'last_token') == ARGV[1] then
  local prev = redis.call('HGET', KEYS[1], 'last_prev')
  if prev then redis.call('HSET', KEYS[1], 'last', prev) end
  redis.call('HDEL', KEYS[1], 'last_token', 'last_prev')
end
return 1
