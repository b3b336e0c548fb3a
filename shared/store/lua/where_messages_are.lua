-- where_messages_are.lua: one atomic look at every place a job's message can be (a
-- message moves from its queue to a worker and into the unacked hash, and two
-- separate reads could see it in neither).
--   KEYS[1]    unacked  kombu's hash of taken, unacknowledged messages
--   KEYS[2..]  queues   the queues (lists) to look in
--   ARGV[1]    window   how many messages to read at the old (right) end of each queue
--   ARGV[2]    prefix   the job key prefix
-- Each message becomes a token: its task id (an ofa.entail message's is its job's
-- id), or for a scan chunk "chunk:{scan}:{created_at}" (a chunk's jobs are created
-- together, so they share their creation time; the message's headers name its first
-- job) or "chunkscan:{scan}" when that job's record is gone. Each queue also gives
-- its length and the earliest send time of the messages read (a job's dispatched_at,
-- else its created_at).
-- Reply: {unacked tokens, {length, earliest or false, tokens} per queue}.
local unacked = KEYS[1]
local window, prefix = tonumber(ARGV[1]), ARGV[2]

local function read(m, stamp)
  local at = string.find(m, '"headers"', 1, true)
  if not at then return false, nil end
  local task = string.match(m, '"task": ?"([^"]+)"', at)
  if task == 'ofa.entail.chunk' then
    local scan, first = string.match(m, 'jobs of scan (%S+): (%w+)', at)
    if not scan then return false, nil end
    local created = redis.call('HGET', prefix .. first, 'created_at')
    if not created then return 'chunkscan:' .. scan, nil end
    return 'chunk:' .. scan .. ':' .. created, tonumber(created)
  end
  local id = string.match(m, '"id": ?"([^"]+)"', at)
  if not id or not stamp then return id or false, nil end
  local sent = redis.call('HMGET', prefix .. id, 'dispatched_at', 'created_at')
  return id, tonumber(sent[1] or sent[2] or '')
end

local held = {}
for _, m in ipairs(redis.call('HVALS', unacked)) do
  local token = read(m, false)
  if token then held[#held + 1] = token end
end
local queues = {}
for i = 2, #KEYS do
  local length = redis.call('LLEN', KEYS[i])
  local tokens, earliest = {}, false
  for _, m in ipairs(redis.call('LRANGE', KEYS[i], -window, -1)) do
    local token, sent = read(m, true)
    if token then tokens[#tokens + 1] = token end
    if sent and (not earliest or sent < earliest) then earliest = sent end
  end
  queues[#queues + 1] = {length, earliest and tostring(earliest), tokens}
end
return {held, queues}
