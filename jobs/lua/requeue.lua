-- KEYS[1]: the shard. ARGV: prefix, worker, 'all' | 'some', job ids (with 'some'), then wake_max (always last).
-- Puts a worker's claimed ids back in the ready sets: on graceful stop (jobs it never started)
-- and when another worker recovers a dead one ('all', which also forgets the worker).
local worker, mode, wake_max = ARGV[2], ARGV[3], tonumber(ARGV[#ARGV])
local processing_key = processing_key_of(worker)
local ids = {}
if mode == 'all' then
  ids = redis.call('HKEYS', processing_key)
else
  for i = 4, #ARGV - 1 do ids[#ids + 1] = ARGV[i] end
end
local requeued = 0
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', processing_key, id)
  if entry then
    local tenant, score = string.match(entry, '^([^|]+)|(.+)$')
    redis.call('HDEL', processing_key, id)
    release_slot(tenant)
    make_ready(tenant, id, score)
    requeued = requeued + 1
  end
end
if mode == 'all' then
  redis.call('DEL', processing_key)
  redis.call('ZREM', workers_key, worker)
  redis.call('HDEL', slots_key, worker)
end
wake(requeued, wake_max)
return requeued
