-- gcra.lua: admit n requests at once when the bucket's new theoretical arrival time
-- (TAT) stays within B*T of now (the server's clock, so API hosts agree).
--   KEYS[1] bucket       the TAT (ms on the server's clock)
--   ARGV[1] interval_ms  the emission interval T (60 s / rate)
--   ARGV[2] burst        B
--   ARGV[3] cost         n
-- Reply: {admitted, remaining, retry_after_ms, reset_ms}.
local bucket = KEYS[1]
local T, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local limit = T * burst
local tat = tonumber(redis.call('GET', bucket) or '0')
if tat < now then tat = now end
local new_tat = tat + T * cost
if new_tat - now > limit then
  return {0, 0, tostring(new_tat - limit - now), tostring(tat - now)}
end
redis.call('SET', bucket, tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, math.floor((limit - (new_tat - now)) / T), '0', tostring(new_tat - now)}
