-- KEYS[1]: the shard (every job here is of a tenant of it). ARGV: prefix, wake_max, n, then (tenant, job id, ready score, run_at ms) for each of n jobs,
-- then m, then (channel, message) for each of m publishes, then (key, field, amount) counter
-- increments until the end. One call indexes new jobs, announces them and counts them, so the
-- API's after-commit work is one round trip (a worker's claim cannot come between them).
local wake_max = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = now_ms()
local ready, delayed = 0, 0
local last = 3 + 4 * n
for i = 4, last, 4 do
  local tenant, id, score, run_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if run_at > now then
    redis.call('ZADD', delayed_key, run_at, tenant .. '|' .. score .. '|' .. id)
    delayed = delayed + 1
  else
    make_ready(tenant, id, score)
    ready = ready + 1
  end
end
local m = tonumber(ARGV[last + 1] or '0')
local i = last + 2
for _ = 1, m do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i + 2 <= #ARGV do
  redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
-- A new delayed job may be due before idle workers planned to look again: wake one.
wake(ready + math.min(delayed, 1), wake_max)
return ready
