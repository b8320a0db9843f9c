-- Shared helpers, prepended to every script. Keys are built from the prefix (ARGV[1]) because
-- a tenant's ready set is only known inside the script. The queue's scripts (enqueue, claim,
-- release, requeue, remove) work on one queue shard: KEYS[1] is its base `P:{q<k>}` (a hash tag,
-- so on a Redis Cluster the call goes to the shard's node and every key below is in its slot).
-- A tenant's own scripts (rate limit, budgets) get KEYS[1] = `P:{t:<tenant>}` the same way.
-- These names are the Lua side of `Keys` in jobs/queue.py: change both together.
local prefix = ARGV[1]
local shard = KEYS[1] or (prefix .. ':{q0}')
local ring_key = shard .. ':tenants'
local active_key = shard .. ':active'
local delayed_key = shard .. ':delayed'
local running_key = shard .. ':running'
local limits_key = shard .. ':limits'
local workers_key = shard .. ':workers'
local slots_key = shard .. ':slots'
local slots_total_key = shard .. ':slots:total'
-- Not in the shard's slot: only used on one Redis (a cluster's wake tokens are pushed by
-- jobs/queue.py, the scripts get wake_max 0 there).
local wake_key = prefix .. ':wake'
local ws_procs_key = prefix .. ':ws:procs'
local circuits_key = prefix .. ':circuits'

local function ready_key(tenant) return shard .. ':ready:' .. tenant end
local function processing_key_of(worker) return shard .. ':processing:' .. worker end
local function tenant_key(tenant) return prefix .. ':{t:' .. tenant .. '}' end
local function rate_key(tenant) return tenant_key(tenant) .. ':rate' end
local function email_recipients_key(tenant) return tenant_key(tenant) .. ':email-recipients' end
local function replay_key(tenant) return tenant_key(tenant) .. ':replay' end
local function ws_proc_key(process) return prefix .. ':ws:proc:' .. process end
local function host_slots_key(host) return prefix .. ':host:' .. host .. ':slots' end
local function host_breaker_key(host) return prefix .. ':host:' .. host .. ':breaker' end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Put a job in its tenant's ready set and the tenant in the ring (once).
local function make_ready(tenant, id, score)
  redis.call('ZADD', ready_key(tenant), 'NX', score, id)
  if redis.call('SADD', active_key, tenant) == 1 then
    redis.call('RPUSH', ring_key, tenant)
  end
end

-- Take a tenant out of the ring once its ready set is empty.
local function deactivate_if_empty(tenant)
  if redis.call('ZCARD', ready_key(tenant)) == 0 then
    redis.call('LREM', ring_key, -1, tenant)
    redis.call('SREM', active_key, tenant)
  end
end

-- Wake up to n idle workers blocked on the wake list; the list stays short and expires.
local function wake(n, max_tokens)
  if n <= 0 or max_tokens <= 0 then return end
  if n > max_tokens then n = max_tokens end
  local tokens = {}
  for i = 1, n do tokens[i] = '1' end
  redis.call('LPUSH', wake_key, unpack(tokens))
  redis.call('LTRIM', wake_key, 0, max_tokens - 1)
  redis.call('EXPIRE', wake_key, 60)
end

-- A claimed job no longer counts against its tenant's running jobs.
local function release_slot(tenant)
  local left = redis.call('HINCRBY', running_key, tenant, -1)
  if left <= 0 then redis.call('HDEL', running_key, tenant) end
end
