-- finish.lua: jobs end (succeeded or failed), each in one atomic step, and are
-- announced on the done channel together, in one message.
-- Many jobs a call (lib.lua's for_each); for each job:
--   keys[1] job          the job's record
--   keys[2] inflight     the key's in-flight mark
--   keys[3] deadlines    unfinished jobs by dispatch deadline or lease
--   keys[4] pending      unfinished jobs by creation time
--   keys[5] hooks        the job's webhooks
--   keys[6] verdict_key  the key's cached verdict
--   keys[7] held         image bytes held, by class
--   keys[8] interactive  the interactive ones of pending
--   argv[1] job_id
--   argv[2] job_ttl      seconds
--   argv[3] keep_mark    '1': the in-flight mark stays (a verdict to join); '0': it
--                        goes if it is this job's
--   argv[4] channel      the done channel
--   argv[5] verdict_ttl  seconds
--   argv[6] verdict      the verdict to cache ('' when cached elsewhere)
--   argv[7] prefix       the job key prefix
--   argv[8..]            the final fields and values
-- Reply per job: {its webhooks (taken: the caller sends them), 1 when its payload is
-- its own in the payload store (the caller removes it: lib.lua's drop_payload)}. The handles other keys
-- hold on the job take its final fields, and their webhooks are taken with the job's
-- own (each hook names the id its submitter knows). Every job's announcement ("id
-- record-as-JSON", a line each) goes in one message: a listener wakes and parses once
-- a call, not once a job.
local function finish(keys, argv)
  local job, inflight, deadlines, pending = keys[1], keys[2], keys[3], keys[4]
  local hooks_key, verdict_key, held, interactive = keys[5], keys[6], keys[7], keys[8]
  local job_id, job_ttl, keep_mark, channel = argv[1], argv[2], argv[3], argv[4]
  local verdict_ttl, verdict, prefix = argv[5], argv[6], argv[7]

  if verdict ~= '' then redis.call('SET', verdict_key, verdict, 'EX', verdict_ttl) end
  redis.call('HSET', job, unpack(argv, 8))
  redis.call('EXPIRE', job, job_ttl)
  if keep_mark == '1' then
    redis.call('EXPIRE', inflight, job_ttl)
  elseif redis.call('GET', inflight) == job_id then
    redis.call('DEL', inflight)
  end
  local ours = drop_payload(job, held)
  redis.call('ZREM', deadlines, job_id)
  redis.call('ZREM', pending, job_id)
  redis.call('ZREM', interactive, job_id)
  local hooks = redis.call('LRANGE', hooks_key, 0, -1)
  redis.call('DEL', hooks_key)
  local handles = redis.call('LRANGE', job .. ':handles', 0, -1)
  if #handles > 0 then
    local names = {'status', 'verdict', 'cached', 'error', 'started_at', 'finished_at'}
    local final = redis.call('HMGET', job, unpack(names))
    for _, hid in ipairs(handles) do
      local handle = prefix .. hid
      if redis.call('EXISTS', handle) == 1 and not redis.call('HGET', handle, 'status') then
        for i, name in ipairs(names) do
          if final[i] then redis.call('HSET', handle, name, final[i]) end
        end
        for _, h in ipairs(redis.call('LRANGE', handle .. ':hooks', 0, -1)) do
          hooks[#hooks + 1] = h
        end
        redis.call('DEL', handle .. ':hooks')
      end
    end
    redis.call('DEL', job .. ':handles')
  end
  return {{hooks, ours}, channel, job_id .. ' ' .. cjson.encode(redis.call('HGETALL', job))}
end

local out = for_each(finish)
local said, channel = {}, nil
for i, r in ipairs(out) do said[i], channel, out[i] = r[3], r[2], r[1] end
if channel then redis.call('PUBLISH', channel, table.concat(said, '\n')) end
return out
