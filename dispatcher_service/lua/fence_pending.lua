-- In-flight WAHA requests of a campaign that have not expired (expired ones are dropped).
-- KEYS: inflight. Returns their count.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
