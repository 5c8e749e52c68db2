-- Fragment (included by other scripts): the slot computation of pace_reserve and pace_reserve_send.
-- reserve_slot(pace, plog, gap, mph, mpd, token, nwin, woff, now[, wu]) returns the reserved slot or -1;
-- windows are ARGV[woff + 2w], ARGV[woff + 2w + 1]; `wu` (warmup_args) adds the warm-up cap of the
-- slot's day: a full day pushes the slot to the next day's start.
-- #include warmup
--   slot = max(now, last_reserved_slot + gap, last_actual + gap)
-- `last_actual` is when the chip's previous send ENDED, so the random gap is measured from the send
-- WAHA really got, not from its plan: a late send pushes the next one back.
local function reserve_slot(pace, plog, gap, mph, mpd, token, nwin, woff, now, wu)
  redis.call('ZREMRANGEBYSCORE', plog, '-inf', now - 86401)
  if wu then warmup_roll(wu.key, math.floor(now / wu.D)) end
  local last = tonumber(redis.call('HGET', pace, 'last') or '0')
  local la = tonumber(redis.call('HGET', pace, 'last_actual') or '0')
  local slot = math.max(now, last + gap, la + gap)
  for i = 1, 64 do
    local moved = false
    if nwin >= 0 then
      local found = false
      for w = 0, nwin - 1 do
        local s, e = tonumber(ARGV[woff + 2 * w]), tonumber(ARGV[woff + 1 + 2 * w])
        if slot < e then
          if slot < s then slot = s; moved = true end
          found = true
          break
        end
      end
      if not found then return -1 end
    end
    for _, cap in ipairs({{mph, 3600}, {mpd, 86400}}) do
      local limit, span = cap[1], cap[2]
      if limit > 0 then
        local n = redis.call('ZCOUNT', plog, '(' .. (slot - span), '+inf')
        if n >= limit then
          local r = redis.call('ZRANGEBYSCORE', plog, '(' .. (slot - span), '+inf', 'WITHSCORES', 'LIMIT', n - limit, 1)
          local ns = tonumber(r[2]) + span + 0.001
          if ns > slot then slot = ns; moved = true end
        end
      end
    end
    if wu and not moved then
      local day = math.floor(slot / wu.D)
      local cap, used = warmup_room(wu.key, day, wu.ws, wu.wf, wu.wm)
      if used >= cap then slot = (day + 1) * wu.D; moved = true end
    end
    if not moved then
      if wu then warmup_add(wu.key, math.floor(slot / wu.D), 1) end
      redis.call('HSET', pace, 'last', tostring(slot), 'last_prev', tostring(last), 'last_token', token)
      redis.call('ZADD', plog, slot, token)
      redis.call('EXPIRE', pace, 172800)
      redis.call('EXPIRE', plog, 172800)
      return slot
    end
  end
  return -1
end
