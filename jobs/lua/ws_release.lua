-- ARGV: prefix, process, then the fields a closed socket was counted under ("total" included).
local own = ws_proc_key(ARGV[2])
for i = 3, #ARGV do
  if redis.call('HINCRBY', own, ARGV[i], -1) <= 0 then redis.call('HDEL', own, ARGV[i]) end
end
return 1
