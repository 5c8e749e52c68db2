-- Fragment (included by other scripts): chip warm-up (pacing.Limits.warmup_*), a daily cap that
-- starts low and grows each day the chip sends. State, per chip, in the hash `warm`:
--   done      sending days already over (days before today with at least one send)
--   d:<day>   live reservations/sends on day <day> (day = floor(t / day_seconds)), today and later
-- A released reservation is taken back (pace_release), so a day counts only once it is over with
-- a send left in it: days without sends do not count.
-- warmup_roll(warm, today): closes the days before today (done += those with sends).
-- warmup_room(warm, day, ws, wf, wm): {cap, used} of `day` (day >= today, after warmup_roll): its
--   sending-day number k = done + (open days before it with sends) + 1 and
--   cap = min(wm, floor(ws * wf^(k-1))).
-- warmup_add(warm, day, n): n more sends on `day`.
local WARM_TTL = 400 * 86400
local function warmup_roll(warm, today)
  local flat = redis.call('HGETALL', warm)
  local closed = 0
  for i = 1, #flat, 2 do
    local f = flat[i]
    if string.sub(f, 1, 2) == 'd:' and tonumber(string.sub(f, 3)) < today then
      if tonumber(flat[i + 1]) > 0 then closed = closed + 1 end
      redis.call('HDEL', warm, f)
    end
  end
  if closed > 0 then redis.call('HINCRBY', warm, 'done', closed) end
end
local function warmup_room(warm, day, ws, wf, wm)
  local flat = redis.call('HGETALL', warm)
  local k, used = 1, 0
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f == 'done' then
      k = k + tonumber(flat[i + 1])
    elseif string.sub(f, 1, 2) == 'd:' then
      local d, n = tonumber(string.sub(f, 3)), tonumber(flat[i + 1])
      if d < day and n > 0 then k = k + 1 end
      if d == day then used = n end
    end
  end
  local cap = math.min(wm, math.floor(ws * wf ^ (k - 1) + 1e-9))
  return cap, used
end
local function warmup_add(warm, day, n)
  redis.call('HINCRBY', warm, 'd:' .. string.format('%d', day), n)
  redis.call('EXPIRE', warm, WARM_TTL)
end
-- warmup_args(key, at): the warm-up arguments ARGV[at..at+3] = day_seconds, start, factor, max
-- (after the windows, so callers without warm-up pass nothing), or nil when absent.
local function warmup_args(key, at)
  if ARGV[at] == nil or ARGV[at] == '' then return nil end
  return {key = key, D = tonumber(ARGV[at]), ws = tonumber(ARGV[at + 1]), wf = tonumber(ARGV[at + 2]),
          wm = tonumber(ARGV[at + 3])}
end
