-- The heartbeat of many lanes of one worker in one step (lane/heartbeat.py): lane_lock_renew of each.
-- KEYS: beats, lock_1, lane_1 .. lock_n, lane_n; ARGV: ttl_ms, owner_1, member_1, .., owner_n, member_n.
-- Returns one 1 or 0 per lock, in order (0: not ours any more, its owner must stop).
-- One TIME and one ZADD for all the renewed lanes (heartbeat.py sends 500 lanes a call: 1,000 ZADD
-- values, well within unpack's limit; a TIME and a ZADD per lane were half of the
-- inner calls: 10,000 sleeping lanes renewed every 1.5 s were ~27,000 Redis calls a second).
-- #include lock_renew
local out = {}
local beats = {}
local expiry = beat_expiry(ARGV[1])
for i = 1, (#KEYS - 1) / 2 do
  if lock_renew(KEYS[2 * i], nil, ARGV[2 * i], ARGV[1], nil, KEYS[2 * i + 1]) then
    out[i] = 1
    beats[#beats + 1] = expiry
    beats[#beats + 1] = ARGV[2 * i + 1]
  else
    out[i] = 0
  end
end
if #beats > 0 then
  redis.call('ZADD', KEYS[1], unpack(beats))
end
return out
