-- cancel.lua: a queued job nobody joined is cancelled (failed as "cancelled", its key
-- freed, its webhooks taken: the caller sends them); otherwise nothing changes and
-- the reply says why.
--   KEYS[1] job          the job's record
--   KEYS[2] inflight     the key's in-flight mark
--   KEYS[3] deadlines    unfinished jobs by dispatch deadline or lease
--   KEYS[4] pending      unfinished jobs by creation time
--   KEYS[5] hooks        the job's webhooks
--   KEYS[6] (unused: the job's record again, to keep the layout of finish.lua)
--   KEYS[7] held         image bytes held, by class
--   KEYS[8] interactive  the interactive ones of pending
--   ARGV[1] job_id
--   ARGV[2] now          seconds since the epoch (finished_at)
--   ARGV[3] job_ttl      seconds
--   ARGV[4] channel      the done channel
-- Reply: {outcome ('gone', 'unchanged', 'detached', 'cancelled'), status, hooks, 1 when
-- the cancelled job's payload is its own in the payload store (the caller removes it)}.
local job, inflight, deadlines, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local hooks_key, held, interactive = KEYS[5], KEYS[7], KEYS[8]
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
local ours = drop_payload(job, held)
if redis.call('GET', inflight) == job_id then redis.call('DEL', inflight) end
local hooks = redis.call('LRANGE', hooks_key, 0, -1)
redis.call('DEL', hooks_key)
redis.call('PUBLISH', channel, job_id)
return {'cancelled', 'failed', hooks, ours}
