-- Shared helpers, prepended to every script. Keys are built from the prefix (ARGV[1]) because
-- a tenant's ready set is only known inside the script; the queue targets one Redis (no Cluster).
-- These names are the Lua side of `Keys` in jobs/queue.py: change both together.
local prefix = ARGV[1]
local ring_key = prefix .. ':tenants'
local active_key = prefix .. ':active'
local delayed_key = prefix .. ':delayed'
local running_key = prefix .. ':running'
local limits_key = prefix .. ':limits'
local wake_key = prefix .. ':wake'
local workers_key = prefix .. ':workers'
local slots_key = prefix .. ':slots'
local slots_total_key = prefix .. ':slots:total'
local ws_procs_key = prefix .. ':ws:procs'
local circuits_key = prefix .. ':circuits'

local function ready_key(tenant) return prefix .. ':ready:' .. tenant end
local function processing_key_of(worker) return prefix .. ':processing:' .. worker end
local function rate_key(tenant) return prefix .. ':rate:' .. tenant end
local function email_recipients_key(tenant) return prefix .. ':email-recipients:' .. tenant end
local function replay_key(tenant) return prefix .. ':replay:' .. tenant end
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
  if n <= 0 then return end
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
