-- refund.lua: one admitted request given back: the bucket's TAT moves back by T,
-- never before now (a bucket back at now is simply full).
--   KEYS[1] bucket       the TAT (ms on the server's clock)
--   ARGV[1] interval_ms  the emission interval T
local bucket, T = KEYS[1], tonumber(ARGV[1])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', bucket) or '0') - T
if tat <= now then return redis.call('DEL', bucket) end
redis.call('SET', bucket, tostring(tat), 'PX', math.ceil(tat - now) + 1000)
return 1
