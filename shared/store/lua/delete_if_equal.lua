-- delete_if_equal.lua: a lock is released only by the holder of its token.
--   KEYS[1] lock
--   ARGV[1] token
-- Reply: 1 when deleted, 0 when another holds it (or nobody).
local lock, token = KEYS[1], ARGV[1]
if redis.call('GET', lock) == token then return redis.call('DEL', lock) end
return 0
