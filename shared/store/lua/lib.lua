-- lib.lua: functions shared by the scripts that load it first (scripts.py:
-- ``Script(name, lib=True)`` sends this file and the script as one body).

-- A job's image leaves the held-bytes count (by the job's class: a scan's job is
-- 'bulk') as the job ends: the record's ``size`` is taken off once (then removed from
-- the record, so a second end takes nothing). The bytes themselves are in the payload
-- store, never here: returns 1 when the job's payload is its own there (``payload``
-- empty) and still to be removed by the caller, else 0 (a reference to a scan row's
-- object or file, or already ended).
local function drop_payload(job, held)
  local size = redis.call('HGET', job, 'size')
  if not size then return 0 end
  local class = 'interactive'
  if redis.call('HEXISTS', job, 'scan') == 1 then class = 'bulk' end
  size = tonumber(size)
  if size > 0 and redis.call('HINCRBY', held, class .. '_bytes', -size) <= 0 then
    redis.call('HDEL', held, class .. '_bytes')
  end
  redis.call('HDEL', job, 'size')
  if (redis.call('HGET', job, 'payload') or '') == '' then return 1 end
  return 0
end

-- Runs ``one(keys, argv)`` for each item of a call that carries many (a chunk's
-- jobs: one command, one reply, instead of one of each per job), in one atomic step.
-- KEYS: each item's keys one after the other, the same number for each.
-- ARGV[1]: that number; then for each item: the count of its arguments, the arguments.
-- Returns each item's reply, in order (false for none).
local function for_each(one)
  local n = tonumber(ARGV[1])
  local out, a = {}, 2
  for i = 0, #KEYS / n - 1 do
    local keys = {}
    for j = 1, n do keys[j] = KEYS[i * n + j] end
    local m = tonumber(ARGV[a])
    local argv = {unpack(ARGV, a + 1, a + m)}
    a = a + 1 + m
    out[i + 1] = one(keys, argv) or false
  end
  return out
end
