-- discard.lua: a job that was never sent (its message refused, or not confirmed on
-- disk) is removed whole: record (its image's bytes off the held count), mark,
-- indexes, message. Reply: 1 when its payload was its own in the payload store (the
-- caller removes it), else 0.
--   KEYS[1] job          the job's record
--   KEYS[2] inflight     the key's in-flight mark
--   KEYS[3] deadlines    unfinished jobs by dispatch deadline or lease
--   KEYS[4] pending      unfinished jobs by creation time
--   KEYS[5] hooks        the job's webhooks
--   KEYS[6] queue        where its message went (the job's record when none was)
--   KEYS[7] held         image bytes held, by class
--   KEYS[8] interactive  the interactive ones of pending
--   ARGV[1] job_id
--   ARGV[2] message      the message pushed with the record ('' when none was)
local job, inflight, deadlines, pending = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local hooks_key, queue, held, interactive = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local job_id, message = ARGV[1], ARGV[2]

local ours = drop_payload(job, held)
redis.call('DEL', job, hooks_key)
if redis.call('GET', inflight) == job_id then redis.call('DEL', inflight) end
redis.call('ZREM', deadlines, job_id)
redis.call('ZREM', pending, job_id)
redis.call('ZREM', interactive, job_id)
if message ~= '' then redis.call('LREM', queue, 1, message) end
return ours
