-- ARGV: prefix, process, ttl (ms), tenant cap, key cap, then the fields to count for the socket
-- ("t:{tenant}", "k:{key digest}"). Each field is summed over the live API processes and checked
-- against its cap (0: none); if all pass, the socket is counted in this process's hash.
-- Returns {1}, or {0, field, open} for the first cap reached. Processes whose counts expired
-- (they stopped refreshing them: crashed or killed) are dropped on the way.
local prefix, process = ARGV[1], ARGV[2]
local ttl, tenant_cap, key_cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local procs_key = prefix .. ':ws:procs'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

for _, gone in ipairs(redis.call('ZRANGEBYSCORE', procs_key, '-inf', now)) do
  redis.call('DEL', prefix .. ':ws:proc:' .. gone)
end
redis.call('ZREMRANGEBYSCORE', procs_key, '-inf', now)
local procs = redis.call('ZRANGE', procs_key, 0, -1)

for i = 6, #ARGV do
  local field = ARGV[i]
  local cap = key_cap
  if string.sub(field, 1, 2) == 't:' then cap = tenant_cap end
  if cap > 0 then
    local open = 0
    for _, p in ipairs(procs) do
      open = open + (tonumber(redis.call('HGET', prefix .. ':ws:proc:' .. p, field)) or 0)
    end
    if open >= cap then return {0, field, open} end
  end
end

local own = prefix .. ':ws:proc:' .. process
redis.call('HINCRBY', own, 'total', 1)
for i = 6, #ARGV do redis.call('HINCRBY', own, ARGV[i], 1) end
redis.call('PEXPIRE', own, ttl)
redis.call('ZADD', procs_key, now + ttl, process)
return {1}
