-- ARGV: prefix, process, ttl (ms), then field, count pairs: this process's open sockets as its
-- memory knows them. Replaces the process's hash (correcting any drift) and extends its life;
-- with no pairs, the process is removed.
local process, ttl = ARGV[2], tonumber(ARGV[3])
local own = ws_proc_key(process)
redis.call('DEL', own)
if #ARGV < 5 then
  redis.call('ZREM', ws_procs_key, process)
  return 0
end
for i = 4, #ARGV, 2 do redis.call('HSET', own, ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', own, ttl)
redis.call('ZADD', ws_procs_key, now_ms() + ttl, process)
return 1
