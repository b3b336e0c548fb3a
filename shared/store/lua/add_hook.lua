-- add_hook.lua: a webhook joins a job that has not ended. The finisher takes the list
-- in the same step as the final status, so each hook is sent by exactly one party:
-- the finisher, or (reply 'finished') the caller. A handle's hooks wait on the handle,
-- for the job it follows (the finisher takes them with the job's own).
--   KEYS[1] job        the job's (or handle's) record
--   KEYS[2] hooks      its webhooks
--   ARGV[1] hook       the hook (JSON)
--   ARGV[2] ttl        seconds
--   ARGV[3] prefix     the job key prefix
-- Reply: 'added', 'finished' or 'gone'.
local job, hooks_key = KEYS[1], KEYS[2]
local hook, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]

local status = redis.call('HGET', job, 'status')
if not status then
  local of = redis.call('HGET', job, 'handle_of')
  if not of then return 'gone' end
  status = redis.call('HGET', prefix .. of, 'status')
  if not status then return 'gone' end
end
if status == 'succeeded' or status == 'failed' then return 'finished' end
redis.call('RPUSH', hooks_key, hook)
redis.call('EXPIRE', hooks_key, ttl)
return 'added'
