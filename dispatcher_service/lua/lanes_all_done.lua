-- 1 when every lane hash in KEYS has a final state (ARGV[2] or ARGV[3]: FINISHED/FAILED), else 0.
-- Starts at ARGV[1] and stops at the first unfinished lane. Store.maybe_finish_dispatch sends the lanes
-- in growing chunks from the finishing lane's successor, so a lane's end reads a few lane hashes.
local n = #KEYS
local start = tonumber(ARGV[1])
for i = 0, n - 1 do
  local k = KEYS[((start + i) % n) + 1]
  local st = redis.call('HGET', k, 'state')
  if st ~= ARGV[2] and st ~= ARGV[3] then return 0 end
end
return 1
