-- KEYS[1]: the shard (every job here is of a tenant of it). ARGV: prefix, worker, job ids. Forgets ids the worker finished with and frees their slots.
local processing_key = processing_key_of(ARGV[2])
local released = 0
for i = 3, #ARGV do
  local entry = redis.call('HGET', processing_key, ARGV[i])
  if entry then
    redis.call('HDEL', processing_key, ARGV[i])
    release_slot(string.match(entry, '^([^|]+)|'))
    released = released + 1
  end
end
return released
