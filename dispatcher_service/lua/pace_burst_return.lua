-- A burst registered n sends (pace_reserve_burst) but sent only `used` of them (slice or lease
-- over, lane stopped, a failure): the rest must not count for the caps nor the warm-up day.
-- KEYS: pacelog[, warm]; ARGV: token, used, n[, day_seconds]. Returns how many were given back.
local back = 0
for i = tonumber(ARGV[2]) + 1, tonumber(ARGV[3]) do
  local m = ARGV[1] .. ':' .. i
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score then
    redis.call('ZREM', KEYS[1], m)
    back = back + 1
    if #KEYS >= 2 and ARGV[4] then
      local f = 'd:' .. string.format('%d', math.floor(tonumber(score) / tonumber(ARGV[4])))
      if tonumber(redis.call('HGET', KEYS[2], f) or '0') > 0 then redis.call('HINCRBY', KEYS[2], f, -1) end
    end
  end
end
return back
