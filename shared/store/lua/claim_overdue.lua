-- claim_overdue.lua: an overdue job is taken for sending again: queued, one more
-- dispatch, a new dispatch deadline. The send is stamped on the record
-- (dispatched_at, and dispatch_attempts: the starts counted so far), so the reaper can
-- tell a job whose last event was a send from one a worker started and put back.
--   KEYS[1] job          the job's record
--   KEYS[2] deadlines    unfinished jobs by dispatch deadline or lease
--   ARGV[1] job_id
--   ARGV[2] now          seconds since the epoch
--   ARGV[3] deadline     the new dispatch deadline
-- Reply: 1 when taken, 0 when its deadline moved meanwhile (started, or finished).
local job, deadlines = KEYS[1], KEYS[2]
local job_id, now, deadline = ARGV[1], ARGV[2], ARGV[3]

local d = redis.call('ZSCORE', deadlines, job_id)
if not d or tonumber(d) > tonumber(now) then return 0 end
local attempts = redis.call('HGET', job, 'attempts') or '0'
redis.call('HSET', job, 'status', 'queued', 'dispatched_at', now,
           'dispatch_attempts', attempts)
redis.call('HINCRBY', job, 'dispatches', 1)
redis.call('ZADD', deadlines, deadline, job_id)
return 1
