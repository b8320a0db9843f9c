-- ARGV: prefix, process, ttl (ms), then field, count pairs: this process's open sockets as its
-- memory knows them. Replaces the process's hash (correcting any drift) and extends its life;
-- with no pairs, the process is removed.
local prefix, process, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local procs_key = prefix .. ':ws:procs'
local own = prefix .. ':ws:proc:' .. process
redis.call('DEL', own)
if #ARGV < 5 then
  redis.call('ZREM', procs_key, process)
  return 0
end
for i = 4, #ARGV, 2 do redis.call('HSET', own, ARGV[i], ARGV[i + 1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', own, ttl)
redis.call('ZADD', procs_key, now + ttl, process)
return 1
