-- Set the fence according to the epoch rules; returns 'new', 'same' or 'stale:<current>'.
--   run E : allowed over nothing, run:<E, stop:<E; 'same' for run:E.
--   stop E: allowed over nothing, run:<=E, stop:<E; 'same' for stop:>=E; stale over run:>E.
-- KEYS: fence; ARGV: mode ('run' or 'stop'), epoch, ttl (0: none).
local cur = redis.call('GET', KEYS[1])
local mode, e = ARGV[1], tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local function put()
  if ttl > 0 then redis.call('SET', KEYS[1], mode .. ':' .. ARGV[2], 'EX', ttl)
  else redis.call('SET', KEYS[1], mode .. ':' .. ARGV[2]) end
  return 'new'
end
if not cur then return put() end
local cm, ce = string.match(cur, '^(%a+):(%-?%d+)$')
ce = tonumber(ce)
if not cm then return put() end
if mode == 'run' then
  if cm == 'run' and ce == e then return 'same' end
  if ce < e then return put() end
  return 'stale:' .. cur
else
  if cm == 'run' and ce <= e then return put() end
  if cm == 'stop' and ce < e then return put() end
  if cm == 'stop' then return 'same' end
  return 'stale:' .. cur
end
