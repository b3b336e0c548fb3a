-- create_or_join.lua: join the job computing a key, or store a new queued job.
-- Many jobs a call (lib.lua's for_each); for each job:
--   keys[1]  inflight     the key's in-flight mark (the id of the job computing it)
--   keys[2]  job          the new job's record
--   keys[3]  deadlines    unfinished jobs by dispatch deadline or lease
--   keys[4]  pending      unfinished jobs by creation time
--   keys[5]  queue        the model's queue (the job's own record when no message)
--   keys[6]  interactive  the interactive ones of pending
--   keys[7]  held         image bytes held, by class
--   argv[1]  job_id       the new job's id
--   argv[2]  job_ttl      seconds
--   argv[3]  size         the image bytes the job holds in the payload store (0 for
--                         a reference to a scan row's object or file)
--   argv[4]  deadline     the new job's dispatch deadline
--   argv[5]  now          seconds since the epoch
--   argv[6]  prefix       the job key prefix
--   argv[7]  message      the Celery message ('': sent afterwards by the caller)
--   argv[8]  owner        the API key's id ('' for a scan's job)
--   argv[9]  handle_id    the id of a handle, if the join needs one ('' for none)
--   argv[10] class        'interactive' or 'bulk'
--   argv[11..]            the new record's fields and values (``payload``: '' when the
--                         image is in the payload store under the job's name, else the
--                         reference; ``size``)
-- Reply per job: {id told to the submitter, 1 when created, the joined job's deadline
-- or false, the id of the job computing it}.
-- No image bytes pass through here: the caller wrote the payload first (so a record
-- never names a missing one) and removes it again when the reply says "joined".
-- A new job's message is pushed onto its queue in the same atomic step as its record:
-- a job is never stored without its message, nor sent without it. A submission joining
-- another owner's job gets a handle of its own (a record naming the job it follows),
-- so no key ever learns another key's job id.
local function create_or_join(keys, argv)
  local inflight, job, deadlines, pending = keys[1], keys[2], keys[3], keys[4]
  local queue, interactive, held = keys[5], keys[6], keys[7]
  local job_id, job_ttl, size, deadline = argv[1], argv[2], tonumber(argv[3]), argv[4]
  local now, prefix, message = argv[5], argv[6], argv[7]
  local owner, handle_id, class = argv[8], argv[9], argv[10]

  local cur = redis.call('GET', inflight)
  if cur then
    local other = prefix .. cur
    if redis.call('EXISTS', other) == 1 then
      redis.call('HINCRBY', other, 'shared', 1)
      local joined_deadline = redis.call('ZSCORE', deadlines, cur)
      if handle_id ~= '' and redis.call('HGET', other, 'owner') ~= owner then
        local handle = prefix .. handle_id
        redis.call('HSET', handle, 'handle_of', cur, 'owner', owner, 'created_at', now)
        redis.call('EXPIRE', handle, job_ttl)
        redis.call('RPUSH', other .. ':handles', handle_id)
        redis.call('EXPIRE', other .. ':handles', job_ttl)
        return {handle_id, 0, joined_deadline, cur}
      end
      return {cur, 0, joined_deadline, cur}
    end
  end
  redis.call('SET', inflight, job_id, 'EX', job_ttl)
  if size > 0 then redis.call('HINCRBY', held, class .. '_bytes', size) end
  redis.call('HSET', job, unpack(argv, 11))
  redis.call('EXPIRE', job, job_ttl)
  redis.call('ZADD', deadlines, deadline, job_id)
  redis.call('ZADD', pending, now, job_id)
  if class == 'interactive' then redis.call('ZADD', interactive, now, job_id) end
  if message ~= '' then redis.call('LPUSH', queue, message) end
  return {job_id, 1, false, job_id}
end

return for_each(create_or_join)
