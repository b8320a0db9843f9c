-- ARGV: prefix, worker, count, wake_max, fair share (0 < f < 1; else off), reserve (slots),
-- claim_ttl (s: how long the worker's processing hash outlives its last claim or heartbeat),
-- lend (1: lend slots to tenants over their share if nobody else here wants them; 0: not yet,
-- the caller asks the other shards first). KEYS[1]: the shard. Moves due delayed jobs to the ready sets, then takes up to `count` ids, one tenant per turn in
-- ring order, skipping tenants at their concurrency limit. A tenant already running its fair
-- share of the cluster's slots is passed over while another tenant yields a job; if none does,
-- it gets the slots after all (keeping `reserve` of the cluster's slots free). Returns
-- {ids, next due ms or -1, 1 if a tenant over its share was passed over and not lent to}.
local worker, count, wake_max = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local fair_share, reserve = tonumber(ARGV[5] or '0'), tonumber(ARGV[6] or '0')
local claim_ttl = tonumber(ARGV[7])
local lend = ARGV[8] ~= '0'
local processing_key = processing_key_of(worker)
local now = now_ms()

local due = redis.call('ZRANGE', delayed_key, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  local tenant, score, id = string.match(member, '^([^|]+)|([^|]+)|(.+)$')
  if tenant then make_ready(tenant, id, score) end
  redis.call('ZREM', delayed_key, member)
end

-- The cluster's slots: the concurrency of every registered worker (a dead one counts until
-- recovery takes it out of the workers set), from the shard's copy the heartbeats keep. Cached for a second, so a claim costs O(1) in
-- the number of workers; entries of workers that left are dropped here.
local function cluster_slots()
  local cached = redis.call('GET', slots_total_key)
  if cached then return tonumber(cached) end
  local total = 0
  local slots = redis.call('HGETALL', slots_key)
  for i = 1, #slots, 2 do
    if redis.call('ZSCORE', workers_key, slots[i]) then
      total = total + tonumber(slots[i + 1])
    else
      redis.call('HDEL', slots_key, slots[i])
    end
  end
  redis.call('SET', slots_total_key, total, 'PX', 1000)
  return total
end

local function running_of(tenant)
  return tonumber(redis.call('HGET', running_key, tenant) or '0')
end

local function at_limit(tenant, running)
  local limit = redis.call('HGET', limits_key, tenant)
  return limit ~= false and running >= tonumber(limit)
end

local claimed = {}

-- Take the tenant's best job; false when its ready set was empty.
local function take(tenant)
  local popped = redis.call('ZPOPMIN', ready_key(tenant))
  if #popped > 0 then
    redis.call('HSET', processing_key, popped[1], tenant .. '|' .. popped[2])
    redis.call('HINCRBY', running_key, tenant, 1)
    claimed[#claimed + 1] = popped[1]
  end
  deactivate_if_empty(tenant)
  return #popped > 0
end

-- Jobs a tenant may run while others wait (nil: no fair share). No registered worker (a queue
-- used without workers) means no share either.
local slots, share = 0, nil
if fair_share > 0 and fair_share < 1 then
  slots = cluster_slots()
  -- The epsilon keeps 0.3 x 10 (3.0000000000000004 in doubles) a share of 3, not 4.
  if slots > 0 then share = math.ceil(fair_share * slots - 1e-9) end
end

local over_share = {}
local passed = {}
local skipped = 0
while #claimed < count do
  local tenant = redis.call('LMOVE', ring_key, ring_key, 'LEFT', 'RIGHT')
  if not tenant then break end
  local running = running_of(tenant)
  local blocked = at_limit(tenant, running)
  if not blocked and share and running >= share then
    if not passed[tenant] then
      passed[tenant] = true
      over_share[#over_share + 1] = tenant
    end
    blocked = true
  end
  if blocked then
    skipped = skipped + 1
    if skipped >= redis.call('LLEN', ring_key) then break end
  elseif take(tenant) then
    skipped = 0
  end
end

-- No other tenant could use the slots left: lend them to the tenants over their share, round
-- robin (idle capacity is not left unused), but keep `reserve` slots of the cluster free so a
-- tenant whose first job arrives while long jobs fill the cluster starts at once.
if lend and #claimed < count and #over_share > 0 then
  local free = math.huge
  if reserve > 0 then
    free = slots
    for _, n in ipairs(redis.call('HVALS', running_key)) do free = free - tonumber(n) end
  end
  local borrowers = over_share
  while #claimed < count and free > reserve and #borrowers > 0 do
    local again = {}
    for _, tenant in ipairs(borrowers) do
      if #claimed >= count or free <= reserve then break end
      if not at_limit(tenant, running_of(tenant)) and take(tenant) then
        again[#again + 1] = tenant
        free = free - 1
      end
    end
    borrowers = again
  end
end

if #claimed > 0 then
  redis.call('EXPIRE', processing_key, claim_ttl)
end
-- Ready jobs left behind (a claim larger than one worker's share): let another idle worker look.
if #claimed == count and redis.call('LLEN', ring_key) > 0 then
  wake(1, wake_max)
end

local next_due = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
local next_due_ms = -1
if #next_due > 0 then next_due_ms = tonumber(next_due[2]) end
local unlent = 0
if not lend and #claimed < count and #over_share > 0 then unlent = 1 end
return {claimed, next_due_ms, unlent}
