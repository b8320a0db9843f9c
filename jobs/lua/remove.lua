-- KEYS[1]: the shard (every job here is of a tenant of it). ARGV: prefix, then (tenant, job id, ready score) per job. Removes them from ready and delayed.
local removed = 0
for i = 2, #ARGV, 3 do
  local tenant, id, score = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  removed = removed + redis.call('ZREM', ready_key(tenant), id)
  removed = removed + redis.call('ZREM', delayed_key, tenant .. '|' .. score .. '|' .. id)
  if redis.call('ZCARD', ready_key(tenant)) == 0 and redis.call('SISMEMBER', active_key, tenant) == 1 then
    redis.call('LREM', ring_key, 0, tenant)
    redis.call('SREM', active_key, tenant)
  end
end
return removed
