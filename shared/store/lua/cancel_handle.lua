-- cancel_handle.lua: a handle (another key's share in a job) is cancelled while the
-- job is queued: the handle ends failed ("cancelled") with its webhooks taken, the
-- job is shared by one fewer (its owner may then cancel it). A running or finished
-- job is left to finish, and the handle then takes its verdict.
--   KEYS[1] handle     the handle's record
--   KEYS[2] hooks      the handle's webhooks
--   ARGV[1] prefix     the job key prefix
--   ARGV[2] now        seconds since the epoch (finished_at)
--   ARGV[3] channel    the done channel
--   ARGV[4] handle_id
-- Reply: {outcome ('gone', 'unchanged', 'cancelled'), status, hooks}.
local handle, hooks_key = KEYS[1], KEYS[2]
local prefix, now, channel, handle_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local own = redis.call('HGET', handle, 'status')
if own then return {'unchanged', own, {}} end
local job = prefix .. redis.call('HGET', handle, 'handle_of')
local status = redis.call('HGET', job, 'status')
if not status then return {'gone', '', {}} end
if status ~= 'queued' then return {'unchanged', status, {}} end
redis.call('HSET', handle, 'status', 'failed', 'error', 'cancelled', 'finished_at', now)
redis.call('HINCRBY', job, 'shared', -1)
local hooks = redis.call('LRANGE', hooks_key, 0, -1)
redis.call('DEL', hooks_key)
redis.call('PUBLISH', channel, handle_id)
return {'cancelled', 'failed', hooks}
