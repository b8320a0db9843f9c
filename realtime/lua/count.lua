-- ARGV: prefix, field. The field summed over the live API processes (e.g. "total": every open
-- WebSocket of the deployment).
local prefix, field = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local open = 0
for _, p in ipairs(redis.call('ZRANGEBYSCORE', prefix .. ':ws:procs', now, '+inf')) do
  open = open + (tonumber(redis.call('HGET', prefix .. ':ws:proc:' .. p, field)) or 0)
end
return open
