-- Reserve a slot and, when it is due now, also pass the stop fence and take the send in one step
-- (what fence_acquire does with a pace chip), saving two round trips per message at full speed.
-- KEYS: pace, pacelog, lane, fence, inflight[, warm]
-- ARGV: gap, mph, mpd, res_token, run_value, send_token, request_ttl, min_gap, latest, prev_token, nwin,
--       windows...[, warm-up: day_seconds, start, factor, max (warmup_args), with the warm key]
-- `prev_token` (or ''): the lane's previous send of this chip, ended but not yet released; it is
-- released first, whatever the answer (release_prev).
-- Returns 'stop' (fence moved: nothing reserved), '-1' (no window), 'go:<slot>' (reserved AND the
-- send is registered under send_token) or 'slot:<slot>' (reserved for later: sleep, then acquire).
-- #include reserve_slot
-- #include release_prev
-- #include fence_ok
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[10] ~= '' then
  release_prev(KEYS[1], KEYS[5], ARGV[10], now)
  -- tostring keeps 14 digits and may round the stored end up (< 0.1 ms): reserve from there, or
  -- the slot (>= last_actual) would look "not due yet" and the send would take the slow path.
  local stored = tonumber(tostring(now))
  if stored > now then now = stored end
end
if not fence_ok(KEYS[4], KEYS[3], ARGV[5]) then return 'stop' end  -- takeover: fence + lane owner
local wu = warmup_args(KEYS[6], 12 + 2 * math.max(0, tonumber(ARGV[11])))
local slot = reserve_slot(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
                          tonumber(ARGV[11]), 12, now, wu)
if slot < 0 then return '-1' end
redis.call('HSET', KEYS[3], 'next_send_time', tostring(slot))
if slot > now or now > tonumber(ARGV[9]) then return 'slot:' .. tostring(slot) end
local mg = tonumber(ARGV[8])
if mg > 0 then
  local busy = tonumber(redis.call('HGET', KEYS[1], 'busy_until') or '0')
  local la = tonumber(redis.call('HGET', KEYS[1], 'last_actual') or '0')
  if busy > now or now < la + mg then return 'slot:' .. tostring(slot) end
end
local ttl = tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'last_actual', tostring(now), 'busy_until', tostring(now + ttl), 'busy_token', ARGV[6])
redis.call('ZADD', KEYS[5], now + ttl, ARGV[6])
redis.call('EXPIRE', KEYS[5], 3600)
return 'go:' .. tostring(slot)
