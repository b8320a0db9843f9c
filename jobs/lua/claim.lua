-- ARGV: prefix, worker, count, wake_max.
-- Moves due delayed jobs to the ready sets, then takes up to `count` ids, one tenant per turn in
-- ring order, skipping tenants at their concurrency limit. Returns {ids, next due ms or -1}.
local worker, count, wake_max = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local processing_key = prefix .. ':processing:' .. worker
local now = now_ms()

local due = redis.call('ZRANGE', delayed_key, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  local tenant, score, id = string.match(member, '^([^|]+)|([^|]+)|(.+)$')
  if tenant then make_ready(tenant, id, score) end
  redis.call('ZREM', delayed_key, member)
end

local claimed = {}
local skipped = 0
while #claimed < count do
  local tenant = redis.call('LMOVE', ring_key, ring_key, 'LEFT', 'RIGHT')
  if not tenant then break end
  local limit = redis.call('HGET', limits_key, tenant)
  local running = tonumber(redis.call('HGET', running_key, tenant) or '0')
  if limit and running >= tonumber(limit) then
    skipped = skipped + 1
    if skipped >= redis.call('LLEN', ring_key) then break end
  else
    local popped = redis.call('ZPOPMIN', ready_key(tenant))
    if #popped > 0 then
      local id, score = popped[1], popped[2]
      redis.call('HSET', processing_key, id, tenant .. '|' .. score)
      redis.call('HINCRBY', running_key, tenant, 1)
      claimed[#claimed + 1] = id
      skipped = 0
    end
    deactivate_if_empty(tenant)
  end
end
if #claimed > 0 then
  redis.call('EXPIRE', processing_key, 86400)
end
-- Ready jobs left behind (a claim larger than one worker's share): let another idle worker look.
if #claimed == count and redis.call('LLEN', ring_key) > 0 then
  wake(1, wake_max)
end

local next_due = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
local next_due_ms = -1
if #next_due > 0 then next_due_ms = tonumber(next_due[2]) end
return {claimed, next_due_ms}
