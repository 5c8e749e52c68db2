-- Pass the stop fence and register one WAHA request as in flight (fences.Fences.acquire).
-- KEYS: fence, inflight[, pace][, lane]; ARGV: run_value, token, request_ttl, min_gap.
-- A run value carrying an owner ("run:E#owner", see fence_ok) comes with the lane key, last.
-- With a pace key (a send): no other send of the chip may be in flight (busy_until) and `min_gap`
-- must have passed since the END of the chip's previous send (last_actual, moved to the end by
-- fence_release_send), so the gap holds as WAHA sees it. While a send is in flight the earliest next
-- send is min_gap after it ends: the answer is 'wait:<min_gap>'.
-- Returns 'stop' (the fence moved), 'wait:<seconds>' or 'ok'.
-- #include fence_ok
local nk = #KEYS
local lane = nil
if string.find(ARGV[1], '#', 1, true) then lane, nk = KEYS[nk], nk - 1 end
if not fence_ok(KEYS[1], lane, ARGV[1]) then return 'stop' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
if nk >= 3 then
  local mg = tonumber(ARGV[4])
  if mg > 0 then
    local busy = tonumber(redis.call('HGET', KEYS[3], 'busy_until') or '0')
    if busy > now then return 'wait:' .. tostring(mg) end
    local la = tonumber(redis.call('HGET', KEYS[3], 'last_actual') or '0')
    if now < la + mg then return 'wait:' .. tostring(la + mg - now) end
  end
  redis.call('HSET', KEYS[3], 'last_actual', tostring(now), 'busy_until', tostring(now + ttl), 'busy_token', ARGV[2])
  redis.call('EXPIRE', KEYS[3], 172800)
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('EXPIRE', KEYS[2], 3600)
return 'ok'
