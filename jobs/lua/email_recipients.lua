-- KEYS[1]: the tenant's base (P:{t:<tenant>}). ARGV: prefix, tenant, limit (recipients), cost (recipients), window (ms), token (unique).
-- A sliding window of the recipients a tenant's email jobs addressed: each accepted request is
-- one member "<token>:<cost>" of a sorted set scored by its time, and the window's total is kept
-- beside it, so a call costs what expired since the last one, not a sum over the whole hour.
-- Accepts `cost` more if the total stays within `limit`, else says how many ms until enough
-- of it has left the window. Returns {allowed (1/0), total in the window, retry_ms}.
local tenant, limit, cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local window, token = tonumber(ARGV[5]), ARGV[6]
local log_key = email_recipients_key(tenant)
local total_key = log_key .. ':total'
local now = now_ms()

local function cost_of(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local total = tonumber(redis.call('GET', total_key) or '0')
local expired = redis.call('ZRANGEBYSCORE', log_key, '-inf', now - window)
if #expired > 0 then
  for _, member in ipairs(expired) do
    total = total - cost_of(member)
  end
  redis.call('ZREMRANGEBYSCORE', log_key, '-inf', now - window)
  if total < 0 or redis.call('EXISTS', log_key) == 0 then total = 0 end
  if total == 0 then
    redis.call('DEL', total_key)
  else
    redis.call('SET', total_key, total, 'KEEPTTL')
  end
end

if total + cost > limit then
  -- The oldest requests leave the window first: walk them until enough has left.
  local need, freed, start = total + cost - limit, 0, 0
  while true do
    local page = redis.call('ZRANGE', log_key, start, start + 99, 'WITHSCORES')
    if #page == 0 then return {0, total, window} end
    for i = 1, #page, 2 do
      freed = freed + cost_of(page[i])
      if freed >= need then
        return {0, total, math.max(1, tonumber(page[i + 1]) + window - now)}
      end
    end
    start = start + 100
  end
end

total = total + cost
redis.call('ZADD', log_key, now, token .. ':' .. cost)
-- Both keys live as long as the newest request stays in the window.
redis.call('SET', total_key, total, 'PX', window)
redis.call('PEXPIRE', log_key, window)
return {1, total, 0}
