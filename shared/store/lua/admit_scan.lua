-- admit_scan.lua: a key's scans and scan storage, and the service's unfinished scans,
-- counted and capped in one step with the creation, so concurrent starts cannot pass
-- a cap together. A key's expired scans leave its index here.
--   KEYS[1] scan         the new scan's record
--   KEYS[2] deadlines    scans not finalised (the reaper's index)
--   KEYS[3] owners       the owner's scans (scan id -> manifest bytes stored)
--   ARGV[1] mode         'check' or 'create'
--   ARGV[2] cap_all      unfinished scans of the service at most (0: off)
--   ARGV[3] cap_key      unfinished scans of the key at most (0: off)
--   ARGV[4] cap_bytes    manifest bytes the key's scans keep at most (0: off)
--   ARGV[5] stored       this scan's stored bytes
--   ARGV[6] prefix       the scan key prefix
-- With 'create' also:
--   ARGV[7] scan_id
--   ARGV[8] ttl          seconds
--   ARGV[9] deadline     the scan's first deadline
--   ARGV[10..]           the record's fields and values
-- Reply: {verdict ('ok', 'busy', 'key-scans', 'key-bytes'), count}.
local scan, deadlines, owners = KEYS[1], KEYS[2], KEYS[3]
local mode, cap_all, cap_key = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cap_bytes, stored, prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local scan_id, ttl, deadline = ARGV[7], ARGV[8], ARGV[9]

local running = redis.call('ZCARD', deadlines)
if cap_all > 0 and running >= cap_all then return {'busy', running} end
if cap_key > 0 or cap_bytes > 0 then
  local mine = redis.call('HGETALL', owners)
  local active, bytes = 0, 0
  for i = 1, #mine, 2 do
    local status = redis.call('HGET', prefix .. mine[i], 'status')
    if not status then
      redis.call('HDEL', owners, mine[i])
    else
      bytes = bytes + tonumber(mine[i + 1])
      if status == 'queued' or status == 'running' then active = active + 1 end
    end
  end
  if cap_key > 0 and active >= cap_key then return {'key-scans', active} end
  if cap_bytes > 0 and bytes + stored > cap_bytes then return {'key-bytes', bytes} end
end
if mode ~= 'create' then return {'ok', 0} end
redis.call('HSET', scan, unpack(ARGV, 10))
redis.call('EXPIRE', scan, ttl)
redis.call('ZADD', deadlines, deadline, scan_id)
if cap_key > 0 or cap_bytes > 0 then
  redis.call('HSET', owners, scan_id, stored)
  redis.call('EXPIRE', owners, ttl)
end
return {'ok', 0}
