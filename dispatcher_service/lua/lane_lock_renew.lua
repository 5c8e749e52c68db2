-- Extend a held lane lock (the owner's heartbeat). KEYS: lock[, beats]; ARGV: owner, ttl_ms[, member].
-- Returns 1, or 0 if it is not ours (expired, or taken over: the owner must stop).
-- #include lock_renew
if lock_renew(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]) then return 1 end
return 0
