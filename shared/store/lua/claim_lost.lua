-- claim_lost.lua: a job whose message is lost is taken for sending again only if
-- nothing happened to it since the reaper looked (still queued, not started, not sent
-- by anyone else); stamped as claim_overdue.lua stamps a send.
--   KEYS[1] job              the job's record
--   KEYS[2] deadlines        unfinished jobs by dispatch deadline or lease
--   ARGV[1] job_id
--   ARGV[2] now              seconds since the epoch
--   ARGV[3] deadline         the new dispatch deadline
--   ARGV[4] seen_attempts    the attempts the reaper saw
--   ARGV[5] seen_dispatches  the dispatches the reaper saw
-- Reply: 1 when taken, 0 when anything happened to it meanwhile.
local job, deadlines = KEYS[1], KEYS[2]
local job_id, now, deadline = ARGV[1], ARGV[2], ARGV[3]
local seen_attempts, seen_dispatches = ARGV[4], ARGV[5]

local got = redis.call('HMGET', job, 'status', 'attempts', 'dispatches')
if got[1] ~= 'queued' then return 0 end
if (got[2] or '0') ~= seen_attempts or (got[3] or '0') ~= seen_dispatches then return 0 end
redis.call('HSET', job, 'dispatched_at', now, 'dispatch_attempts', seen_attempts)
redis.call('HINCRBY', job, 'dispatches', 1)
redis.call('ZADD', deadlines, deadline, job_id)
return 1
