-- KEYS[1]: the tenant's base (P:{t:<tenant>}). ARGV: prefix, tenant, rate (per second), burst (jobs), cost (jobs).
-- GCRA (a token bucket kept as one "theoretical arrival time"): allows `cost` jobs now if the
-- tenant's bucket has room, else says how many ms until it will. Returns {allowed, retry_ms}.
local tenant, rate, burst, cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local key = rate_key(tenant)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = 1000 / rate
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', key) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0}
