-- KEYS[1]: the tenant's base (P:{t:<tenant>}). ARGV: prefix, tenant, rate (rows/s), burst (rows), wanted (rows; negative gives rows back).
-- A token bucket of replayed rows per tenant: takes up to `wanted` rows. Returns
-- {granted, ms until one row is available again (when none was granted)}.
local tenant = ARGV[2]
local rate, burst, wanted = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local key = replay_key(tenant)
local now = now_ms()
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local granted = 0
if wanted < 0 then
  tokens = math.min(burst, tokens - wanted)
else
  granted = math.min(wanted, math.floor(tokens))
  tokens = tokens - granted
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', key, math.ceil((burst - tokens) * 1000 / rate) + 1000)
local retry = 0
if granted == 0 and wanted > 0 then retry = math.ceil((1 - tokens) * 1000 / rate) end
return {granted, retry}
