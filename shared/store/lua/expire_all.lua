-- expire_all.lua: each of the keys that exists expires soon (one command for a
-- scan's copied jobs, not two a job).
--   KEYS[1..]  any number of keys
--   ARGV[1]    seconds
local seconds = ARGV[1]
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, seconds) end
