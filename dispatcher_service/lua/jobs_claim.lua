-- arq's start check (arq 0.28 Worker.start_jobs: WATCH, EXISTS, ZSCORE, MULTI, PSETEX, EXEC per job)
-- for many jobs in one atomic step (worker.py): a job is claimed when no worker runs it (no
-- in-progress key) and it is still in the queue and due; claiming sets its in-progress key.
-- KEYS: queue, in_progress_1 .. in_progress_n; ARGV: in_progress_ms, now_ms, job_id_1 .. job_id_n.
-- Returns {job_id, score, ...} of the jobs claimed.
local out = {}
local now = tonumber(ARGV[2])
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local id = ARGV[i + 1]
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', KEYS[i], ARGV[1], '1')
      out[#out + 1] = id
      out[#out + 1] = score
    end
  end
end
return out
