-- PauseDispatch's marks in one step: the dispatch PAUSED under the stop's epoch (when it exists)
-- and every lane not FINISHED or FAILED STOPPED (lanes still running mark themselves when they
-- meet the fence; this shows the queued ones at once).
-- KEYS: dispatch, lane...; ARGV: dispatch state, epoch, now, stopped lane state, ttl, done states...
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'epoch', ARGV[2], 'updated', ARGV[3])
end
local done = {}
for i = 6, #ARGV do done[ARGV[i]] = true end
for i = 2, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'state') or '0'
  if not done[st] then
    redis.call('HSET', KEYS[i], 'state', ARGV[4])
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5]))
  end
end
return 1
