-- The heartbeat of many lanes of one worker in one step (lane/heartbeat.py): lane_lock_renew of each.
-- KEYS: beats, lock_1, lane_1 .. lock_n, lane_n; ARGV: ttl_ms, owner_1, member_1, .., owner_n, member_n.
-- Returns one 1 or 0 per lock, in order (0: not ours any more, its owner must stop).
-- #include lock_renew
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  out[i] = lock_renew(KEYS[2 * i], KEYS[1], ARGV[2 * i], ARGV[1], ARGV[2 * i + 1], KEYS[2 * i + 1]) and 1 or 0
end
return out
