-- start.lua: a worker takes the jobs whose messages arrived.
-- Many jobs a call (lib.lua's for_each); for each job:
--   keys[1] job          the job's record
--   keys[2] deadlines    unfinished jobs by dispatch deadline or lease
--   keys[3] verdict      the key's cached verdict
--   argv[1] job_id
--   argv[2] now          seconds since the epoch
--   argv[3] lease        the lease's deadline
--   argv[4] same_server  '1' when the verdict cache is this server (else the caller
--                        reads it)
--   argv[5] key          the message's key
-- Reply per job: {'gone'}, {'finished'}, {'busy'} (another worker's live lease), or
-- {'run', attempts, cached verdict or false, the image's payload reference ('': the
-- job's own in the payload store; an object URL or file: path, read in place)}.
-- A message whose key is not its job's is not this job's work: nothing to do.
local function start(keys, argv)
  local job, deadlines, verdict_key = keys[1], keys[2], keys[3]
  local job_id, now, lease, same_server, key = argv[1], argv[2], argv[3], argv[4], argv[5]

  if redis.call('EXISTS', job) == 0 then return {'gone'} end
  if redis.call('HGET', job, 'key') ~= key then return {'gone'} end
  local status = redis.call('HGET', job, 'status')
  if status == 'succeeded' or status == 'failed' then return {'finished'} end
  if status == 'running' then
    local d = redis.call('ZSCORE', deadlines, job_id)
    if d and tonumber(d) > tonumber(now) then return {'busy'} end
  end
  -- Starts that only waited on the image's store (store_waits) are not tries.
  local attempts = redis.call('HINCRBY', job, 'attempts', 1)
    - tonumber(redis.call('HGET', job, 'store_waits') or '0')
  redis.call('HSET', job, 'status', 'running', 'started_at', now)
  redis.call('ZADD', deadlines, lease, job_id)
  local verdict = false
  if same_server == '1' then verdict = redis.call('GET', verdict_key) end
  if verdict then return {'run', attempts, verdict, ''} end
  return {'run', attempts, false, redis.call('HGET', job, 'payload') or ''}
end

return for_each(start)
