-- ARGV: prefix, wake_max, then (tenant, job id, ready score, run_at ms) per job.
local wake_max = tonumber(ARGV[2])
local now = now_ms()
local ready, delayed = 0, 0
for i = 3, #ARGV, 4 do
  local tenant, id, score, run_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if run_at > now then
    redis.call('ZADD', delayed_key, run_at, tenant .. '|' .. score .. '|' .. id)
    delayed = delayed + 1
  else
    make_ready(tenant, id, score)
    ready = ready + 1
  end
end
-- A new delayed job may be due before idle workers planned to look again: wake one.
wake(ready + math.min(delayed, 1), wake_max)
return ready
