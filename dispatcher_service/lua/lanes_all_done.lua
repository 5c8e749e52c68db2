-- 1 when every lane hash in KEYS has a final state (ARGV[2] or ARGV[3]: FINISHED/FAILED), else 0.
-- Starts at ARGV[1] (the caller's successor: lanes finish roughly in start order, so an unfinished
-- one is usually found at once) and stops at the first unfinished lane: O(1) typical.
local n = #KEYS
local start = tonumber(ARGV[1])
for i = 0, n - 1 do
  local k = KEYS[((start + i) % n) + 1]
  local st = redis.call('HGET', k, 'state')
  if st ~= ARGV[2] and st ~= ARGV[3] then return 0 end
end
return 1
