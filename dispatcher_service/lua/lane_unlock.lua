-- Release the lane lock and, in the same atomic step, collect the "someone wanted this lane" flag:
-- a slice that found the lane busy either set the flag before this runs (we see it and re-enqueue)
-- or runs after it (it gets the lock itself). No work is orphaned between the two.
-- KEYS: lock, want[, lane, beats]; ARGV: owner[, member]. Returns 1 (wanted), 0 (not wanted) or
-- -1 (not our lock). With lane and beats: the lane leaves the heartbeat zset (a clean end is no
-- takeover case) and its `lease_until` (leases a dead owner may hold) is cleared.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if #KEYS >= 4 then
    redis.call('HDEL', KEYS[3], 'lease_until')
    redis.call('ZREM', KEYS[4], ARGV[2])
  end
  local w = redis.call('GET', KEYS[2])
  redis.call('DEL', KEYS[2])
  if w then return 1 end
  return 0
end
return -1
