-- ARGV: prefix, field. The field summed over the live API processes (e.g. "total": every open
-- WebSocket of the deployment).
local field = ARGV[2]
local open = 0
for _, p in ipairs(redis.call('ZRANGEBYSCORE', ws_procs_key, now_ms(), '+inf')) do
  open = open + (tonumber(redis.call('HGET', ws_proc_key(p), field)) or 0)
end
return open
