-- Reserve the chip's next send slot (pacing.Pacer.reserve).
-- KEYS: pace, pacelog[, lane]; ARGV: gap, mph, mpd, token, nwin, windows...
-- The optional lane hash gets next_send_time (GetDispatch) in the same step.
-- Returns the slot (unix s) or '-1' when no window opens within the horizon.
-- #include reserve_slot
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local slot = reserve_slot(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
                          tonumber(ARGV[5]), 6, now)
if slot < 0 then return '-1' end
if #KEYS >= 3 then redis.call('HSET', KEYS[3], 'next_send_time', tostring(slot)) end
return tostring(slot)
