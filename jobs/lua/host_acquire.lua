-- ARGV: prefix, host, holder, limit, lease (ms), cool-down (ms).
-- May `holder` send one request to `host` now? The host's circuit breaker is asked first (an
-- open circuit refuses until its cool-down ends; then one caller, the probe, gets through and
-- the circuit is half-open until the probe's verdict), then its concurrency cap: a sorted set
-- of holder -> lease expiry, where expired leases (a worker that died mid-request) are dropped
-- here, so a slot can never leak for longer than one lease.
-- Returns {1, 'request' | 'probe'}, or {0, 'open' | 'probing', ms when to ask again},
-- or {0, 'busy', 0} when the host has `limit` requests in flight.
local host, holder = ARGV[2], ARGV[3]
local limit, lease, cooldown = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slots_key, breaker_key = host_slots_key(host), host_breaker_key(host)
local now = now_ms()

local state = redis.call('HGET', breaker_key, 'state')
local probe = false
if state == 'open' then
  local until_ms = tonumber(redis.call('HGET', breaker_key, 'until') or '0')
  if now < until_ms then return {0, 'open', until_ms} end
  probe = true
elseif state == 'half_open' then
  local probe_until = tonumber(redis.call('HGET', breaker_key, 'probe_until') or '0')
  if now < probe_until then return {0, 'probing', math.min(probe_until, now + cooldown)} end
  -- No probe in flight (its holder gave no verdict, or died): this caller probes.
  probe = true
end

redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
if redis.call('ZCARD', slots_key) >= limit then return {0, 'busy', 0} end
redis.call('ZADD', slots_key, now + lease, holder)
-- The set lives as long as its longest lease.
if redis.call('PTTL', slots_key) < lease then redis.call('PEXPIRE', slots_key, lease) end

if probe then
  redis.call('HSET', breaker_key, 'state', 'half_open', 'probe', holder, 'probe_until', now + lease)
  redis.call('ZADD', circuits_key, now + lease, host)
  return {1, 'probe'}
end
return {1, 'request'}
