-- ARGV: prefix, host, holder, verdict ('ok' | 'failed' | 'none'), failures to open,
--       cool-down (ms), how long a breaker's state outlives its last change (ms).
-- Gives back `holder`'s slot and tells the host's circuit breaker how the request went:
-- 'ok' (the host answered, below 500) closes the circuit and forgets the failures; 'failed'
-- (network error, timeout, 5xx) adds one consecutive failure, and the one that reaches the
-- threshold, or a failed probe, opens the circuit for the cool-down; 'none' (no request was
-- made, or it was cancelled) says nothing, except that a probe without verdict lets the next
-- caller probe. Returns the circuit's state afterwards: 'closed', 'open' or 'half_open'.
local host, holder, verdict = ARGV[2], ARGV[3], ARGV[4]
local threshold, cooldown, keep = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local slots_key, breaker_key = host_slots_key(host), host_breaker_key(host)
local now = now_ms()

redis.call('ZREM', slots_key, holder)
local state = redis.call('HGET', breaker_key, 'state') or 'closed'
local probing = state == 'half_open' and redis.call('HGET', breaker_key, 'probe') == holder

local function open(failures)
  local until_ms = now + cooldown
  redis.call('HSET', breaker_key, 'state', 'open', 'until', until_ms, 'failures', failures,
    'opened_at', now)
  redis.call('HDEL', breaker_key, 'probe', 'probe_until')
  redis.call('PEXPIRE', breaker_key, keep)
  redis.call('ZADD', circuits_key, until_ms, host)
  return 'open'
end

if verdict == 'ok' then
  redis.call('DEL', breaker_key)
  redis.call('ZREM', circuits_key, host)
  return 'closed'
end
if verdict == 'failed' then
  if state == 'closed' then
    local failures = redis.call('HINCRBY', breaker_key, 'failures', 1)
    if failures >= threshold then return open(failures) end
    redis.call('HSET', breaker_key, 'state', 'closed')
    redis.call('PEXPIRE', breaker_key, keep)
    return 'closed'
  end
  if probing then
    return open(tonumber(redis.call('HGET', breaker_key, 'failures') or '0') + 1)
  end
  -- Open already, or another caller's probe is out: a late failure changes nothing.
  return state
end
if probing then
  redis.call('HSET', breaker_key, 'probe_until', 0)
  redis.call('HDEL', breaker_key, 'probe')
end
return state
