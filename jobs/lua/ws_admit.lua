-- ARGV: prefix, process, ttl (ms), tenant cap, key cap, then the fields to count for the socket
-- ("t:{tenant}", "k:{key digest}"). Each field is summed over the live API processes and checked
-- against its cap (0: none); if all pass, the socket is counted in this process's hash.
-- Returns {1}, or {0, field, open} for the first cap reached. Processes whose counts expired
-- (they stopped refreshing them: crashed or killed) are dropped on the way.
local process = ARGV[2]
local ttl, tenant_cap, key_cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()

for _, gone in ipairs(redis.call('ZRANGEBYSCORE', ws_procs_key, '-inf', now)) do
  redis.call('DEL', ws_proc_key(gone))
end
redis.call('ZREMRANGEBYSCORE', ws_procs_key, '-inf', now)
local procs = redis.call('ZRANGE', ws_procs_key, 0, -1)

for i = 6, #ARGV do
  local field = ARGV[i]
  local cap = key_cap
  if string.sub(field, 1, 2) == 't:' then cap = tenant_cap end
  if cap > 0 then
    local open = 0
    for _, p in ipairs(procs) do
      open = open + (tonumber(redis.call('HGET', ws_proc_key(p), field)) or 0)
    end
    if open >= cap then return {0, field, open} end
  end
end

local own = ws_proc_key(process)
redis.call('HINCRBY', own, 'total', 1)
for i = 6, #ARGV do redis.call('HINCRBY', own, ARGV[i], 1) end
redis.call('PEXPIRE', own, ttl)
redis.call('ZADD', ws_procs_key, now + ttl, process)
return {1}
