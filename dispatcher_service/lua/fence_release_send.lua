-- A send ended (answer, error or timeout): fences.Fences.release(..., pace_chip).
-- KEYS: inflight, pace; ARGV: token.
-- #include release_prev
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
release_prev(KEYS[2], KEYS[1], ARGV[1], now)
return 1
