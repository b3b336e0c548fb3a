-- keep_scan.lua: the coordinator holding a scan's lock extends it and the scan's
-- deadline in one step, only while the lock is still its own (one that expired and
-- was taken by another coordinator is left to that one).
--   KEYS[1] lock       the scan's coordinator lock
--   KEYS[2] deadlines  scans not finalised (the reaper's index)
--   ARGV[1] token      the lock's token
--   ARGV[2] ttl_ms     the lock's new time to live
--   ARGV[3] scan_id
--   ARGV[4] deadline   the scan's next deadline
-- Reply: 1 when kept, 0 when no longer ours.
local lock, deadlines = KEYS[1], KEYS[2]
local token, ttl_ms, scan_id, deadline = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('GET', lock) ~= token then return 0 end
redis.call('PEXPIRE', lock, ttl_ms)
redis.call('ZADD', deadlines, 'XX', deadline, scan_id)
return 1
