-- Reserve the chip's next send slot (pacing.Pacer.reserve).
-- KEYS: pace, pacelog[, lane][, warm]; ARGV: gap, mph, mpd, token, nwin, windows...[, warm-up]
-- The optional lane hash gets next_send_time (GetDispatch) in the same step. With the warm-up
-- arguments (warmup_args: day_seconds, start, factor, max) the last key is the chip's warm-up hash.
-- Returns the slot (unix s) or '-1' when no window opens within the horizon.
-- #include reserve_slot
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wu = warmup_args(KEYS[#KEYS], 6 + 2 * math.max(0, tonumber(ARGV[5])))
local slot = reserve_slot(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4],
                          tonumber(ARGV[5]), 6, now, wu)
if slot < 0 then return '-1' end
if #KEYS >= (wu and 4 or 3) then redis.call('HSET', KEYS[3], 'next_send_time', tostring(slot)) end
return tostring(slot)
