-- A supervisor claims a lane whose owner stopped beating (takeover.py). KEYS: beats, lock;
-- ARGV: member, hold_ms. Returns 1 (claimed: the caller enqueues a takeover slice; the member's
-- score moves hold_ms ahead so no other supervisor claims it meanwhile, and a takeover slice that
-- never starts is claimed again then), 0 (the owner is alive again, or someone claimed it first)
-- or -1 (no such member: the lane ended cleanly).
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(s) > now or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
