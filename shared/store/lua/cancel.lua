-- cancel.lua: a queued job nobody joined is cancelled (failed as "cancelled", its key
-- freed, its webhooks taken: the caller sends them); otherwise nothing changes and
-- the reply says why.
--   KEYS[1] job          the job's record
--   KEYS[2] inflight     the key's in-flight mark
--   KEYS[3] blob         the key's image bytes
--   KEYS[4] deadlines    unfinished jobs by dispatch deadline or lease
--   KEYS[5] pending      unfinished jobs by creation time
--   KEYS[6] hooks        the job's webhooks
--   KEYS[7] (unused: the job's record again, to keep the layout of finish.lua)
--   KEYS[8] held         image bytes held, by class
--   KEYS[9] interactive  the interactive ones of pending
--   ARGV[1] job_id
--   ARGV[2] now          seconds since the epoch (finished_at)
--   ARGV[3] job_ttl      seconds
--   ARGV[4] channel      the done channel
-- Reply: {outcome ('gone', 'unchanged', 'detached', 'cancelled'), status, hooks}.
local job, inflight, blob, deadlines, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local hooks_key, held, interactive = KEYS[6], KEYS[8], KEYS[9]
local job_id, now, job_ttl, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('EXISTS', job) == 0 then return {'gone', '', {}} end
local status = redis.call('HGET', job, 'status')
if status ~= 'queued' then return {'unchanged', status, {}} end
if tonumber(redis.call('HGET', job, 'shared') or '0') > 0 then
  return {'detached', status, {}}
end
redis.call('HSET', job, 'status', 'failed', 'error', 'cancelled', 'finished_at', now)
redis.call('EXPIRE', job, job_ttl)
redis.call('ZREM', deadlines, job_id)
redis.call('ZREM', pending, job_id)
redis.call('ZREM', interactive, job_id)
drop_blob(job, blob, held)
if redis.call('GET', inflight) == job_id then redis.call('DEL', inflight) end
local hooks = redis.call('LRANGE', hooks_key, 0, -1)
redis.call('DEL', hooks_key)
redis.call('PUBLISH', channel, job_id)
return {'cancelled', 'failed', hooks}
