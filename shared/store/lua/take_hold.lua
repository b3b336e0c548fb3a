-- take_hold.lua: a hold on one of a webhook receiver's delivery slots. Expired holds
-- go first; the delivery is admitted only below the bound.
--   KEYS[1] holds    the receiver's holds (sorted set: token -> expiry, ms on the
--                    server's clock)
--   ARGV[1] token    this delivery's hold
--   ARGV[2] bound    deliveries in flight at most
--   ARGV[3] hold_ms  how long a hold lasts
-- Reply: 1 with the hold taken, 0 when the receiver is at its bound (nothing changed
-- but the removal of expired holds).
local holds = KEYS[1]
local token, bound, hold_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
if redis.call('ZCARD', holds) >= bound then return 0 end
redis.call('ZADD', holds, now + hold_ms, token)
redis.call('PEXPIRE', holds, hold_ms)
return 1
