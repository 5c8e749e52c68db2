-- Full speed (the lane's gap is always 0): pass the fence and take up to k sends in ONE step, under
-- one in-flight token that the lane holds for a short burst of sequential sends. Caps and the window
-- are checked for the burst as a whole; each send of it is logged for the caps (score now).
-- KEYS: pace, pacelog, lane, fence, inflight[, warm]
-- ARGV: mph, mpd, run_value, token, request_ttl, k, prev_token, nwin, windows...[, warm-up: day_seconds,
--       start, factor, max (warmup_args), with the warm key: today's warm-up cap bounds the burst]
-- `prev_token`: the lane's previous burst (ended, not yet released): released first.
-- Returns 'stop', '-1' (no window within the horizon), 'slot:<t>' (nothing may leave before t:
-- window closed or a cap reached) or 'go:<n>' (n >= 1 sends registered under token).
-- #include release_prev
-- #include warmup
-- #include fence_ok
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[7] ~= '' then release_prev(KEYS[1], KEYS[5], ARGV[7], now) end
if not fence_ok(KEYS[4], KEYS[3], ARGV[3]) then return 'stop' end  -- takeover: fence + lane owner
local nwin = tonumber(ARGV[8])
if nwin >= 0 then
  local inside, nxt = false, -1
  for w = 0, nwin - 1 do
    local s, e = tonumber(ARGV[9 + 2 * w]), tonumber(ARGV[10 + 2 * w])
    if now < e then
      if now >= s then inside = true else nxt = s end
      break
    end
  end
  if not inside then
    if nxt < 0 then return '-1' end
    redis.call('HSET', KEYS[3], 'next_send_time', tostring(nxt))
    return 'slot:' .. tostring(nxt)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86401)
local n = tonumber(ARGV[6])
for _, cap in ipairs({{tonumber(ARGV[1]), 3600}, {tonumber(ARGV[2]), 86400}}) do
  local limit, span = cap[1], cap[2]
  if limit > 0 then
    local c = redis.call('ZCOUNT', KEYS[2], '(' .. (now - span), '+inf')
    if c >= limit then
      local r = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (now - span), '+inf', 'WITHSCORES', 'LIMIT', c - limit, 1)
      local ns = tonumber(r[2]) + span + 0.001
      redis.call('HSET', KEYS[3], 'next_send_time', tostring(ns))
      return 'slot:' .. tostring(ns)
    end
    n = math.min(n, limit - c)
  end
end
local wu = warmup_args(KEYS[6], 9 + 2 * math.max(0, nwin))
local today = 0
if wu then
  today = math.floor(now / wu.D)
  warmup_roll(wu.key, today)
  local cap, used = warmup_room(wu.key, today, wu.ws, wu.wf, wu.wm)
  if used >= cap then
    local ns = (today + 1) * wu.D
    redis.call('HSET', KEYS[3], 'next_send_time', tostring(ns))
    return 'slot:' .. tostring(ns)
  end
  n = math.min(n, cap - used)
  warmup_add(wu.key, today, n)
end
local members = {}
for i = 1, n do
  members[#members + 1] = now
  members[#members + 1] = ARGV[4] .. ':' .. i
end
redis.call('ZADD', KEYS[2], unpack(members))
local ttl = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'last', tostring(now), 'last_actual', tostring(now), 'busy_until', tostring(now + ttl),
           'busy_token', ARGV[4])
redis.call('HSET', KEYS[3], 'next_send_time', tostring(now))
redis.call('ZADD', KEYS[5], now + ttl, ARGV[4])
redis.call('EXPIRE', KEYS[5], 3600)
redis.call('EXPIRE', KEYS[1], 172800)
redis.call('EXPIRE', KEYS[2], 172800)
return 'go:' .. tostring(n)
