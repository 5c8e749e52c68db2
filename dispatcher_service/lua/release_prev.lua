-- Fragment (included by other scripts): release_prev(pace, inflight, token, now).
-- A send (or burst) ended: it no longer holds a stop back, the chip's pace is measured from `now`
-- (never earlier than the real end, so the pace only gets more conservative) and the chip is free.
local function release_prev(pace, inflight, token, now)
  redis.call('ZREM', inflight, token)
  local la0 = tonumber(redis.call('HGET', pace, 'last_actual') or '0')
  if now > la0 then redis.call('HSET', pace, 'last_actual', tostring(now)) end
  if redis.call('HGET', pace, 'busy_token') == token then
    redis.call('HDEL', pace, 'busy_until', 'busy_token')
  end
  redis.call('EXPIRE', pace, 172800)
end
