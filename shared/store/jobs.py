"""Jobs: records, image blobs, in-flight marks, deadlines, and the verdict cache."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.errors import QueueUnavailableError
from shared.keys import Keys
from shared.models import Job, JobStatus, Verdict
from shared.settings import Settings
from shared.store.codec import bytes_of, decode_hash, now, text_of
from shared.wiring import AsyncRedis, SyncRedis

# Once a scan's coordinator has copied a job's outcome into the scan's results file,
# the job record and its in-flight mark linger this long (for anything that joined the
# job), then go: the durable store holds the scan's window, not its manifest.
SCAN_JOB_LINGER_S = 60


# KEYS: any number; ARGV: seconds. Each key that exists expires in that many seconds.
_EXPIRE_ALL = "for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ARGV[1]) end"

# KEYS: inflight, job, blob, deadlines, pending, queue, interactive pending, held bytes
# ARGV: job id, job ttl, blob ttl, image, dispatch deadline, now, job key prefix,
#       message ('' for none: sent afterwards), owner ('' for a scan's job), handle id
#       ('' for none), class ('interactive' or 'bulk'), fields...
# A new job's Celery message (when given) is pushed onto its queue in the same atomic
# step as its record: a job is never stored without its message, nor sent without it.
# A submission joining another owner's job gets a handle of its own (a record naming
# the job it follows), so no key ever learns another key's job id.
_CREATE_OR_JOIN = """
local prefix, owner, handle_id, class = ARGV[7], ARGV[9], ARGV[10], ARGV[11]
local cur = redis.call('GET', KEYS[1])
if cur then
  local other = prefix .. cur
  if redis.call('EXISTS', other) == 1 then
    redis.call('HINCRBY', other, 'shared', 1)
    local deadline = redis.call('ZSCORE', KEYS[4], cur)
    if handle_id ~= '' and redis.call('HGET', other, 'owner') ~= owner then
      local handle = prefix .. handle_id
      redis.call('HSET', handle, 'handle_of', cur, 'owner', owner, 'created_at', ARGV[6])
      redis.call('EXPIRE', handle, ARGV[2])
      redis.call('RPUSH', other .. ':handles', handle_id)
      redis.call('EXPIRE', other .. ':handles', ARGV[2])
      return {handle_id, 0, deadline, cur}
    end
    return {cur, 0, deadline, cur}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local old = redis.call('STRLEN', KEYS[3])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3])
redis.call('HINCRBY', KEYS[8], class .. '_bytes', string.len(ARGV[4]) - old)
redis.call('HSET', KEYS[2], unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
if class == 'interactive' then redis.call('ZADD', KEYS[7], ARGV[6], ARGV[1]) end
if ARGV[8] ~= '' then redis.call('LPUSH', KEYS[6], ARGV[8]) end
return {ARGV[1], 1, false, ARGV[1]}
"""

# KEYS: job, deadlines, blob, verdict
# ARGV: job id, now, lease deadline, 1 when the verdict cache is this server, the
#       message's key
# A message whose key is not its job's is not this job's work: nothing to do.
_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HGET', KEYS[1], 'key') ~= ARGV[5] then return {'gone'} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then return {'finished'} end
if status == 'running' then
  local d = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if d and tonumber(d) > tonumber(ARGV[2]) then return {'busy'} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local verdict = false
if ARGV[4] == '1' then verdict = redis.call('GET', KEYS[4]) end
if verdict then return {'run', attempts, verdict, false} end
return {'run', attempts, false, redis.call('GET', KEYS[3])}
"""

# Lua: the image bytes held for a job leave the held-bytes count (by the job's class)
# as its blob goes. KEYS[1] job, KEYS[3] blob, KEYS[8] held bytes.
_DROP_BLOB = """
local class = 'interactive'
if redis.call('HEXISTS', KEYS[1], 'scan') == 1 then class = 'bulk' end
local held = redis.call('STRLEN', KEYS[3])
if held > 0 then
  if redis.call('HINCRBY', KEYS[8], class .. '_bytes', -held) <= 0 then
    redis.call('HDEL', KEYS[8], class .. '_bytes')
  end
  redis.call('DEL', KEYS[3])
end
"""

# KEYS: job, inflight, blob, deadlines, pending, hooks, verdict, held bytes,
#       interactive pending
# ARGV: job id, job ttl, 1 to keep the in-flight mark (0: drop it if it is this job's),
#       done channel, verdict ttl, verdict ('' when cached elsewhere), job key prefix,
#       fields...
# A job's end in one atomic step; returns its webhooks (taken: the caller sends them),
# the done channel and its announcement ("id record-as-JSON"), which ``_FINISH_EACH``
# publishes, a call's announcements in one message (``JobStore.announcements``). The
# handles other keys hold on the job take its final fields, and their webhooks are
# taken with the job's own (each hook names the id its submitter knows).
_FINISH = (
    """
if ARGV[6] ~= '' then redis.call('SET', KEYS[7], ARGV[6], 'EX', ARGV[5]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
elseif redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
"""
    + _DROP_BLOB
    + """
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
local hooks = redis.call('LRANGE', KEYS[6], 0, -1)
redis.call('DEL', KEYS[6])
local handles = redis.call('LRANGE', KEYS[1] .. ':handles', 0, -1)
if #handles > 0 then
  local final = redis.call('HMGET', KEYS[1], 'status', 'verdict', 'cached', 'error',
                           'started_at', 'finished_at')
  local names = {'status', 'verdict', 'cached', 'error', 'started_at', 'finished_at'}
  for _, hid in ipairs(handles) do
    local handle = ARGV[7] .. hid
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
  redis.call('DEL', KEYS[1] .. ':handles')
end
return {hooks, ARGV[4], ARGV[1] .. ' ' .. cjson.encode(redis.call('HGETALL', KEYS[1]))}
"""
)


def _for_each(body: str, then: str = "") -> str:
    """A one-item script made to run for many items in one call (a chunk's jobs: one
    command, one script body sent, one reply, instead of one of each per job). KEYS:
    each item's keys one after the other, the same number each; ARGV: that number,
    then for each item the count of its arguments and the arguments. Returns each
    item's reply, in order (``then``, Lua run after the last item, may change them:
    ``out``). The items run in one atomic step."""
    return f"""
local function one(KEYS, ARGV)
{body}
end
local n = tonumber(ARGV[1])
local out, a = {{}}, 2
for i = 0, #KEYS / n - 1 do
  local keys = {{}}
  for j = 1, n do keys[j] = KEYS[i * n + j] end
  local m = tonumber(ARGV[a])
  local argv = {{unpack(ARGV, a + 1, a + m)}}
  a = a + 1 + m
  out[i + 1] = one(keys, argv) or false
end
{then}
return out
"""


_CREATE_OR_JOIN_EACH = _for_each(_CREATE_OR_JOIN)
_START_EACH = _for_each(_START)
# Every job's announcement in one message: a listener wakes and parses once a call,
# not once a job (a scan's chunk of 32 cost the API and the coordinator 32 each).
_FINISH_EACH = _for_each(
    _FINISH,
    then="""
local said, channel = {}, nil
for i, r in ipairs(out) do said[i], channel, out[i] = r[3], r[2], r[1] end
if channel then redis.call('PUBLISH', channel, table.concat(said, '\\n')) end
""",
)
ITEMS_PER_CALL = 64  # a script call's share of a long list: Valkey stays responsive
# The reaper's look for lost messages: at most this many queued jobs a pass, and this
# many messages read at the old end of each queue (both bound the script's work: a few
# milliseconds of Valkey's time a pass at most).
LOST_CANDIDATES = 500
LOST_WINDOW = 1000


def queue_each(pipe: Any, script: str, calls: Sequence[tuple[list[str], list[Any]]]) -> int:
    """Queue on ``pipe`` the (KEYS, ARGV) ``calls`` of a ``_for_each`` script, at most
    ``ITEMS_PER_CALL`` to a command; returns how many commands (``each_reply`` joins
    their replies)."""
    commands = 0
    for i in range(0, len(calls), ITEMS_PER_CALL):
        group = calls[i : i + ITEMS_PER_CALL]
        keys = [k for ks, _ in group for k in ks]
        argv: list[Any] = [len(group[0][0])]
        for _, args in group:
            argv += [len(args), *args]
        pipe.eval(script, len(keys), *keys, *argv)
        commands += 1
    return commands


def each_reply(replies: Sequence[Any]) -> list[Any]:
    """The items' replies from the replies of ``queue_each``'s commands (an error reply
    raises: it stands for all of that command's items)."""
    out: list[Any] = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        out.extend(reply)
    return out


def confirm_on_disk(reply: Any, undo: Callable[[], None], what: str, replicas: int = 0) -> None:
    """Check a WAITAOF reply: the write is fsynced on the durable store (and on
    ``replicas`` of its replicas), or it is undone and ``QueueUnavailableError`` says
    why."""
    if isinstance(reply, Exception):
        undo()
        raise QueueUnavailableError(
            f"durable acknowledgement (OFA_DURABLE_ACK) failed: {reply}. The durable "
            "store needs appendonly yes, or set OFA_DURABLE_ACK=off"
        )
    if int(reply[0]) < 1:
        undo()
        raise QueueUnavailableError(f"the durable store did not confirm the {what} on disk in time")
    if int(reply[1]) < replicas:
        # The primary has it, but no replica confirmed it: a failover now could lose it,
        # so it is not acknowledged (OFA_DURABLE_ACK=replica).
        undo()
        raise QueueUnavailableError(
            f"no replica of the durable store confirmed the {what} on disk in time"
        )


# KEYS: job, inflight, blob, deadlines, pending, hooks, (unused), held bytes,
#       interactive pending
# ARGV: job id, now (finished_at), job ttl, done channel
# A queued job nobody joined is cancelled (failed, its key freed, its webhooks taken:
# the caller sends them); otherwise nothing changes and the reply says why:
# {outcome, status, hooks}.
_CANCEL = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', '', {}} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then return {'unchanged', status, {}} end
if tonumber(redis.call('HGET', KEYS[1], 'shared') or '0') > 0 then
  return {'detached', status, {}}
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', 'cancelled', 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
"""
    + _DROP_BLOB
    + """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local hooks = redis.call('LRANGE', KEYS[6], 0, -1)
redis.call('DEL', KEYS[6])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return {'cancelled', 'failed', hooks}
"""
)

# KEYS: handle, handle's hooks; ARGV: job key prefix, now, done channel, handle id
# A handle (another key's share in a job) is cancelled while the job is queued: the
# handle ends failed ("cancelled") with its webhooks taken, the job is shared by one
# fewer (its owner may then cancel it). A running or finished job is left to finish,
# and the handle then takes its verdict. Reply: {outcome, status, hooks}.
_CANCEL_HANDLE = """
local own = redis.call('HGET', KEYS[1], 'status')
if own then return {'unchanged', own, {}} end
local job = ARGV[1] .. redis.call('HGET', KEYS[1], 'handle_of')
local status = redis.call('HGET', job, 'status')
if not status then return {'gone', '', {}} end
if status ~= 'queued' then return {'unchanged', status, {}} end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', 'cancelled', 'finished_at', ARGV[2])
redis.call('HINCRBY', job, 'shared', -1)
local hooks = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {'cancelled', 'failed', hooks}
"""

# KEYS: job, inflight, blob, deadlines, pending, hooks, queue, held bytes,
#       interactive pending
# ARGV: job id, message ('' when none was pushed)
# A job that was never sent (its message refused, or not confirmed on disk) is removed
# whole: record, blob (and its bytes from the held count), mark, indexes, message.
_DISCARD = (
    _DROP_BLOB
    + """
redis.call('DEL', KEYS[1], KEYS[6])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
if ARGV[2] ~= '' then redis.call('LREM', KEYS[7], 1, ARGV[2]) end
return 1
"""
)

# KEYS: job, deadlines; ARGV: job id, now, new dispatch deadline
# A send is stamped on the record (``dispatched_at``, and ``dispatch_attempts``: the
# starts counted so far), so the reaper can tell a job whose last event was a send
# from one a worker started and put back (``JobStore.lost_messages``).
_CLAIM_OVERDUE = """
local d = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not d or tonumber(d) > tonumber(ARGV[2]) then return 0 end
local attempts = redis.call('HGET', KEYS[1], 'attempts') or '0'
redis.call('HSET', KEYS[1], 'status', 'queued', 'dispatched_at', ARGV[2],
           'dispatch_attempts', attempts)
redis.call('HINCRBY', KEYS[1], 'dispatches', 1)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: job, deadlines
# ARGV: job id, now, new dispatch deadline, the attempts and dispatches the reaper saw
# A job whose message is lost is sent again only if nothing happened to it since the
# reaper looked (still queued, not started, not sent by anyone else); stamped as
# ``_CLAIM_OVERDUE`` stamps a send.
_CLAIM_LOST = """
local job_id, now, deadline = ARGV[1], ARGV[2], ARGV[3]
local seen_attempts, seen_dispatches = ARGV[4], ARGV[5]
local got = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'dispatches')
if got[1] ~= 'queued' then return 0 end
if (got[2] or '0') ~= seen_attempts or (got[3] or '0') ~= seen_dispatches then return 0 end
redis.call('HSET', KEYS[1], 'dispatched_at', now, 'dispatch_attempts', seen_attempts)
redis.call('HINCRBY', KEYS[1], 'dispatches', 1)
redis.call('ZADD', KEYS[2], deadline, job_id)
return 1
"""

# KEYS: kombu's unacked hash, then the queues (lists) to look in
# ARGV: how many messages to read at the old (right) end of each queue, job key prefix
# One atomic look at every place a job's message can be: a message moves from its
# queue to a worker and into the unacked hash, and two separate reads could see it in
# neither. Each message becomes a token: its task id (an ``ofa.entail`` message's is
# its job's id), or for a scan chunk "chunk:{scan}:{created_at}" (a chunk's jobs are
# created together, so they share their creation time; the message's headers name its
# first job) or "chunkscan:{scan}" when that job's record is gone. Each queue also
# gives its length and the earliest send time of the messages read (a job's
# ``dispatched_at``, else its ``created_at``). Reply: {unacked tokens, {length, earliest
# or false, tokens} per queue}.
_WHERE_MESSAGES_ARE = """
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
for _, m in ipairs(redis.call('HVALS', KEYS[1])) do
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
"""


# KEYS: job (or handle), its hooks; ARGV: hook (JSON), ttl, job key prefix. A webhook
# joins a job that has not ended; the finisher takes the list in the same transaction
# as the final status, so each hook is sent by exactly one party: the finisher, or
# (reply 'finished') the caller. A handle's hooks wait on the handle, for the job it
# follows (the finisher takes them with the job's own).
_ADD_HOOK = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  local of = redis.call('HGET', KEYS[1], 'handle_of')
  if not of then return 'gone' end
  status = redis.call('HGET', ARGV[3] .. of, 'status')
  if not status then return 'gone' end
end
if status == 'succeeded' or status == 'failed' then return 'finished' end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 'added'
"""


@dataclass(frozen=True)
class Hook:
    """A webhook waiting for a job: where to POST, and the delivery's id (the same on
    every retry, so receivers can drop replays)."""

    url: str
    delivery_id: str
    # The id its submitter knows, when that is not the finished job's own (a handle).
    job_id: str | None = None

    def encode(self) -> str:
        doc = {"url": self.url, "delivery": self.delivery_id}
        if self.job_id:
            doc["job"] = self.job_id
        return json.dumps(doc)

    @classmethod
    def decode(cls, raw: Any) -> Hook:
        doc = json.loads(text_of(raw))
        return cls(doc["url"], doc["delivery"], doc.get("job"))


@dataclass(frozen=True)
class Created:
    """What ``create_or_join`` did."""

    job_id: str  # what the submitter is told: the job's id, or its own handle's
    created: bool
    overdue: bool = False  # joined a job past its deadline: send it again now
    computed_by: str = ""  # the job that computes it (differs from job_id for a handle)

    @property
    def job(self) -> str:
        """The id of the job doing the work (its announcement on the done channel)."""
        return self.computed_by or self.job_id


class StartAction(StrEnum):
    """What a worker should do with a message for a job."""

    RUN = "run"  # compute it (or finish it from the cached verdict)
    FINISHED = "finished"  # nothing: it has ended
    GONE = "gone"  # nothing: its record expired
    BUSY = "busy"  # nothing: another worker holds a live lease on it
    POISON = "poison"  # fail it: started too many times without finishing


@dataclass(frozen=True)
class Started:
    """What ``start`` decided, with the cached verdict or the image when it is RUN."""

    action: StartAction
    cached: bytes | None = None
    blob: bytes | None = None
    attempts: int = 0


@dataclass(frozen=True)
class Read:
    """A job as one API key may see it: the job, who submitted it, and the id of the
    job that computes it (itself, or for a handle the job it follows)."""

    job: Job
    owner: str | None
    computed_by: str
    key: str | None = None  # the verdict key (what a cancel needs)


@dataclass(frozen=True)
class Outcome:
    """A job's state as a scan coordinator collects it."""

    status: JobStatus | None  # None: the record is gone
    verdict: str | None
    error: str | None
    scan_id: str | None


class JobStore:
    """Jobs, their image blobs and in-flight marks (durable), and verdicts (cache)."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        sync: SyncRedis | None = None,
        aio: AsyncRedis | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self._sync = sync
        self._aio = aio

    @property
    def sync(self) -> SyncRedis:
        assert self._sync is not None, "this JobStore was built without blocking clients"
        return self._sync

    @property
    def aio(self) -> AsyncRedis:
        assert self._aio is not None, "this JobStore was built without asyncio clients"
        return self._aio

    # -- creation --------------------------------------------------------------------

    def create_or_join(
        self,
        key: str,
        image: bytes,
        text: str,
        premise: str | None,
        scan_id: str | None = None,
        owner: str | None = None,
    ) -> Created:
        """Join the job computing ``key`` (counting one more sharer), or store a new
        queued job: mark, image blob, record and dispatch deadline, atomically. A mark
        whose job record is gone is replaced. An ``owner`` (the API key's id) is
        recorded on a new job; joining another owner's job gives a handle of its own.
        With durable acknowledgement on, returns only once the durable store has
        fsynced the write (WAITAOF on the connection that wrote)."""
        if owner is not None:
            t = time.time()
            call = self._create_call(key, image, text, premise, None, t, owner=owner)
            return self._create_one(call, t, key)
        return self.create_or_join_many([(key, image, text, premise)], scan_id)[0]

    def create_or_join_many(
        self,
        items: Sequence[tuple[str, bytes, str, str | None]],
        scan_id: str | None = None,
        tenant: str | None = None,
    ) -> list[Created]:
        """``create_or_join`` for several (key, image, text, premise) in one round trip
        (a scan's chunk), with one WAITAOF for all of them when it is on. A scan's jobs
        have no owner: nobody reads them by id but the scan's coordinator."""
        t = time.time()
        calls = [self._create_call(k, i, tx, p, scan_id, t, tenant=tenant) for k, i, tx, p in items]
        pipe = self.sync.durable.pipeline(transaction=False)
        commands = self._queue_create(pipe, calls)
        replies = pipe.execute(raise_on_error=False)
        out = [self._created(reply, t) for reply in each_reply(replies[:commands])]
        if self.settings.durable_ack_on and any(c.created for c in out):

            def undo() -> None:
                for c, (key, *_) in zip(out, items, strict=True):
                    if c.created:
                        self.discard(c.job_id, key)

            confirm_on_disk(replies[commands], undo, "job", self._replicas)
        return out

    def create_and_send(
        self,
        key: str,
        image: bytes,
        text: str,
        premise: str | None,
        job_id: str,
        queue: str,
        message: bytes,
        owner: str = "",
    ) -> Created:
        """``acreate_and_send`` for blocking callers: record, blob, deadlines and, for a
        new job, its message in one atomic round trip (then WAITAOF when it is on)."""
        t = time.time()
        call = self._create_call(
            key, image, text, premise, None, t, job_id, queue, message, owner=owner
        )
        return self._create_one(call, t, key, (queue, message))

    def _create_one(
        self,
        call: tuple[list[str], list[Any]],
        t: float,
        key: str,
        sent: tuple[str, bytes] | None = None,
    ) -> Created:
        """Run one ``_CREATE_OR_JOIN`` call (blocking), then WAITAOF when it is on; a new
        job the store did not confirm is removed again (with its ``sent`` message)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        self._queue_create(pipe, [call])
        replies = pipe.execute(raise_on_error=False)
        got = self._created(each_reply(replies[:1])[0], t)
        if self.settings.durable_ack_on and got.created:
            confirm_on_disk(
                replies[1], lambda: self.discard(got.job_id, key, sent), "job", self._replicas
            )
        return got

    async def acreate_and_send(
        self,
        key: str,
        image: bytes,
        text: str,
        premise: str | None,
        job_id: str,
        queue: str,
        message: bytes,
        owner: str = "",
        tenant: str | None = None,
        traceparent: str | None = None,
    ) -> Created:
        """``create_or_join`` from the event loop for a job whose Celery ``message``
        (built for ``job_id``) goes onto ``queue`` in the same atomic step when the job
        is new: one round trip for record, blob, deadlines and message. ``owner``: the
        submitting API key's id (a join of another key's job gets its own handle);
        ``tenant``: the key whose private cache the verdict goes to, if any."""
        t = time.time()
        call = self._create_call(
            key, image, text, premise, None, t, job_id, queue, message, owner, tenant, traceparent
        )
        pipe = self.aio.durable.pipeline(transaction=False)
        self._queue_create(pipe, [call])
        replies = await pipe.execute(raise_on_error=False)
        got = self._created(each_reply(replies[:1])[0], t)
        if self.settings.durable_ack_on and got.created:
            try:
                confirm_on_disk(replies[1], lambda: None, "job", self._replicas)
            except QueueUnavailableError:
                await self.adiscard(got.job_id, key, (queue, message))
                raise
        return got

    def _queue_create(self, pipe: Any, calls: list[tuple[list[str], list[Any]]]) -> int:
        """Queue on ``pipe`` (blocking or asyncio) ``_CREATE_OR_JOIN`` for each call (in
        as few commands as ``queue_each`` makes: their number is returned), then WAITAOF
        when durable acknowledgement is on (its reply last): the primary's AOF, and with
        ``OFA_DURABLE_ACK=replica`` one replica's too."""
        commands = queue_each(pipe, _CREATE_OR_JOIN_EACH, calls)
        if self.settings.durable_ack_on:
            pipe.execute_command("WAITAOF", 1, self._replicas, self.settings.durable_ack_timeout_ms)
        return commands

    @property
    def _replicas(self) -> int:
        """Replicas WAITAOF waits for (``Settings.durable_ack_replicas``)."""
        return self.settings.durable_ack_replicas

    def _create_call(
        self,
        key: str,
        image: bytes,
        text: str,
        premise: str | None,
        scan_id: str | None,
        t: float,
        job_id: str | None = None,
        queue: str | None = None,
        message: bytes = b"",
        owner: str | None = None,
        tenant: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[list[str], list[str | bytes | float]]:
        """KEYS and ARGV of one job's ``_CREATE_OR_JOIN``. An ``owner`` (interactive
        submissions) is recorded, and a join of another owner's job makes a handle."""
        model_id, revision = self.settings.model_tag
        k = self.keys
        job_id = job_id or uuid.uuid4().hex
        record: dict[str, str] = {
            "status": JobStatus.QUEUED,
            "key": key,
            "model": model_id,
            "revision": revision,
            "text": text,
            "created_at": f"{t:.6f}",
        }
        if premise is not None:
            record["premise"] = premise
        if scan_id:
            record["scan"] = scan_id
        if owner:
            record["owner"] = owner
        if tenant:
            record["tenant"] = tenant
        if traceparent:  # the job's trace (shared/tracing.py): the reaper's re-send keeps it
            record["traceparent"] = traceparent
        fields = [x for pair in record.items() for x in pair]
        args: list[str | bytes | float] = [
            job_id,
            self.settings.job_ttl_s,
            self.settings.blob_ttl_s,
            image,
            t + self.settings.dispatch_deadline_s,
            t,
            k.job_prefix(),
            message,
            owner or "",
            uuid.uuid4().hex if owner else "",
            "bulk" if scan_id else "interactive",
            *fields,
        ]
        keys = [
            k.inflight(key),
            k.job(job_id),
            k.blob(key),
            k.job_deadlines(),
            k.job_pending(),
            queue or k.job(job_id),  # no message: an unused key of the same job
            k.job_pending_interactive(),
            k.held_bytes(),
        ]
        return keys, args

    @staticmethod
    def _created(reply: Any, t: float) -> Created:
        if isinstance(reply, Exception):
            raise reply
        got, created, deadline, computed_by = reply
        overdue = deadline is not None and float(deadline) < t
        return Created(text_of(got), bool(created), overdue, text_of(computed_by))

    def discard(self, job_id: str, key: str, sent: tuple[str, bytes] | None = None) -> None:
        """Remove a job that was never sent (its record, blob, mark and deadlines);
        ``sent``: the (queue, message) pushed with the record, taken back too."""
        self.sync.durable.eval(_DISCARD, *self._discard_call(job_id, key, sent))

    async def adiscard(self, job_id: str, key: str, sent: tuple[str, bytes] | None = None) -> None:
        """``discard`` from the event loop; ``sent``: the (queue, message) pushed with
        the record, taken back too if no worker has taken it yet (one that has finds no
        job and does nothing)."""
        await self.aio.durable.eval(_DISCARD, *self._discard_call(job_id, key, sent))

    def _discard_call(
        self, job_id: str, key: str, sent: tuple[str, bytes] | None
    ) -> tuple[Any, ...]:
        """numkeys, KEYS and ARGV of ``_DISCARD``."""
        keys = self._ending_keys(job_id, key, sent[0] if sent else self.keys.job(job_id))
        return (len(keys), *keys, job_id, sent[1] if sent else b"")

    def _ending_keys(self, job_id: str, key: str, seventh: str) -> list[str]:
        """KEYS of the scripts that end a job (``_FINISH``, ``_CANCEL``, ``_DISCARD``),
        one layout so that ``_DROP_BLOB`` reads the same slots in each: job, in-flight
        mark, blob, deadlines, pending, hooks, ``seventh`` (the script's own: verdict,
        queue, or the job again where it has none), held bytes, interactive pending."""
        k = self.keys
        return [
            k.job(job_id),
            k.inflight(key),
            k.blob(key),
            k.job_deadlines(),
            k.job_pending(),
            k.job_hooks(job_id),
            seventh,
            k.held_bytes(),
            k.job_pending_interactive(),
        ]

    # -- the worker's transitions ----------------------------------------------------

    def start(self, job_id: str, key: str) -> Started:
        """Take the job (a message for it arrived): what the worker should do.

        Finished, vanished, or running under another worker's live lease: nothing
        (duplicate messages are harmless). Otherwise the job is running under a lease
        of ``lease_s``; the cached verdict is returned if there is one (a redelivery
        finishes without computing), else the image blob. A job started more than
        ``max_attempts`` times is reported as poison.
        """
        return self.start_many([(job_id, key)])[0]

    def start_many(self, jobs: Sequence[tuple[str, str]]) -> list[Started]:
        """``start`` for several (job id, key) pairs in one round trip (a chunk)."""
        r, k = self.sync, self.keys
        t = time.time()
        same = r.cache is r.durable
        pipe = r.durable.pipeline(transaction=False)
        calls = [
            (
                [k.job(job_id), k.job_deadlines(), k.blob(key), k.verdict(key)],
                [job_id, t, t + self.settings.lease_s, 1 if same else 0, key],
            )
            for job_id, key in jobs
        ]
        queue_each(pipe, _START_EACH, calls)
        replies = each_reply(pipe.execute())
        running = [i for i, reply in enumerate(replies) if text_of(reply[0]) == StartAction.RUN]
        cached: dict[int, bytes | None] = {i: bytes_of(replies[i][2]) for i in running}
        if not same and running:
            got = r.cache.mget([k.verdict(jobs[i][1]) for i in running])
            cached = {i: bytes_of(v) for i, v in zip(running, got, strict=True)}
        out = []
        for i, reply in enumerate(replies):
            action = StartAction(text_of(reply[0]))
            if action != StartAction.RUN:
                out.append(Started(action))
                continue
            attempts, verdict, blob = int(reply[1]), cached[i], bytes_of(reply[3])
            if attempts > self.settings.max_attempts and verdict is None:
                out.append(Started(StartAction.POISON, attempts=attempts))
                continue
            out.append(
                Started(
                    StartAction.RUN,
                    cached=verdict,
                    blob=None if verdict is not None else blob,
                    attempts=attempts,
                )
            )
        return out

    def renew(self, job_ids: Iterable[str]) -> None:
        """Extend the leases of jobs this worker is computing (only while unfinished)."""
        ids = list(job_ids)
        if ids:
            deadline = time.time() + self.settings.lease_s
            self.sync.durable.zadd(self.keys.job_deadlines(), dict.fromkeys(ids, deadline), xx=True)

    def release(self, job_id: str) -> float:
        """A transient failure: back to queued, to be sent again by the reaper after a
        backoff that doubles with each attempt. Returns the backoff."""
        attempts = int(self.sync.durable.hget(self.keys.job(job_id), "attempts") or 1)
        backoff = min(self.settings.retry_backoff_s * 2 ** max(attempts - 1, 0), 300.0)
        pipe = self.sync.durable.pipeline()
        pipe.hset(self.keys.job(job_id), "status", JobStatus.QUEUED)
        pipe.zadd(self.keys.job_deadlines(), {job_id: time.time() + backoff}, xx=True)
        pipe.execute()
        return backoff

    def add_hook(self, job_id: str, url: str) -> tuple[str, Hook]:
        """Ask for ``url`` to be told when the job ends: ('added', hook) when the
        finisher will send it, ('finished', hook) when the job already ended (the
        caller sends it), ('gone', hook) when the job is unknown."""
        hook = Hook(url, uuid.uuid4().hex, job_id)
        got = self.sync.durable.eval(
            _ADD_HOOK,
            2,
            self.keys.job(job_id),
            self.keys.job_hooks(job_id),
            hook.encode(),
            self.settings.job_ttl_s,
            self.keys.job_prefix(),
        )
        return text_of(got), hook

    def succeed(self, job_id: str, key: str, verdict: Verdict | bytes, cached: bool) -> list[Hook]:
        """Cache the verdict and finish the job. The in-flight mark stays (as long as
        the record) pointing at this finished job: a submit that raced past the cache
        lookup joins it instead of starting another."""
        return self.succeed_many([(job_id, key, verdict)], cached)[0]

    def fail(self, job_id: str, key: str, error: str) -> list[Hook]:
        """Fail the job for good; the next identical submission starts afresh."""
        fields = {"status": JobStatus.FAILED, "error": error, "finished_at": now()}
        return self._finish(job_id, key, fields, keep_mark=False)

    def succeed_many(
        self, items: Sequence[tuple[str, str, Verdict | bytes]], cached: bool = False
    ) -> list[list[Hook]]:
        """``succeed`` for several (job id, key, verdict) in one transaction (a chunk's
        verdicts). Returns each job's webhooks, in order."""
        r = self.sync
        docs = [v if isinstance(v, bytes) else v.model_dump_json().encode() for _, _, v in items]
        same = r.cache is r.durable
        if not same:  # the verdicts first: a job never reads as succeeded before
            cache = r.cache.pipeline(transaction=False)
            for (_, key, _), doc in zip(items, docs, strict=True):
                cache.set(self.keys.verdict(key), doc, ex=self.settings.verdict_ttl_s)
            cache.execute()
        # A chunk's jobs finish in one script call (up to ``ITEMS_PER_CALL``; a longer
        # list's calls are one transaction besides).
        pipe = self.sync.durable.pipeline(transaction=len(items) > ITEMS_PER_CALL)
        calls = [
            self._finish_call(
                job_id,
                key,
                {
                    "status": JobStatus.SUCCEEDED,
                    "verdict": doc,
                    "cached": "1" if cached else "0",
                    "finished_at": now(),
                },
                True,
                doc if same else None,
            )
            for (job_id, key, _), doc in zip(items, docs, strict=True)
        ]
        queue_each(pipe, _FINISH_EACH, calls)
        return [[Hook.decode(h) for h in hooks] for hooks in each_reply(pipe.execute())]

    def _finish(
        self,
        job_id: str,
        key: str,
        fields: dict[str, Any],
        keep_mark: bool,
        verdict: bytes | None = None,
    ) -> list[Hook]:
        """Final fields, no deadline, the blob gone, waiting API requests told, the
        job's webhooks taken (returned, for the caller to send); one round trip."""
        pipe = self.sync.durable.pipeline(transaction=False)
        queue_each(pipe, _FINISH_EACH, [self._finish_call(job_id, key, fields, keep_mark, verdict)])
        return [Hook.decode(h) for h in each_reply(pipe.execute())[0]]

    def _finish_call(
        self,
        job_id: str,
        key: str,
        fields: dict[str, Any],
        keep_mark: bool,
        verdict: bytes | None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the script that finishes a job; its reply lists the job's
        webhooks."""
        k = self.keys
        keys = self._ending_keys(job_id, key, k.verdict(key))
        args = [
            job_id,
            self.settings.job_ttl_s,
            1 if keep_mark else 0,
            k.done_channel(),
            self.settings.verdict_ttl_s,
            b"" if verdict is None else verdict,
            k.job_prefix(),
            *(x for pair in fields.items() for x in pair),
        ]
        return keys, args

    # -- the reaper's view -----------------------------------------------------------

    def overdue(self, limit: int = 500) -> list[str]:
        """Unfinished jobs past their deadline, most overdue first."""
        ids = self.sync.durable.zrangebyscore(
            self.keys.job_deadlines(), "-inf", time.time(), start=0, num=limit
        )
        return [text_of(i) for i in ids]

    def record(self, job_id: str) -> dict[str, str]:
        """The raw record ({} when gone)."""
        return decode_hash(self.sync.durable.hgetall(self.keys.job(job_id)))

    def forget(self, job_id: str) -> None:
        """Drop a finished or vanished job from the deadline indexes."""
        pipe = self.sync.durable.pipeline()
        pipe.zrem(self.keys.job_deadlines(), job_id)
        pipe.zrem(self.keys.job_pending(), job_id)
        pipe.execute()

    def claim_overdue(self, job_id: str) -> bool:
        """Atomically take an overdue job for sending again: queued, one more dispatch,
        a new dispatch deadline. False when its deadline moved meanwhile (a worker
        started it, or it finished): then nothing is to be sent."""
        return self._claim(_CLAIM_OVERDUE, job_id)

    def _claim(self, script: str, job_id: str, *expected: str) -> bool:
        """Run a claim script (KEYS: job, deadlines; ARGV: job id, now, new dispatch
        deadline, then ``expected``): True when the job was taken for sending again."""
        k = self.keys
        t = time.time()
        deadline = t + self.settings.dispatch_deadline_s
        return bool(
            self.sync.durable.eval(
                script, 2, k.job(job_id), k.job_deadlines(), job_id, t, deadline, *expected
            )
        )

    def lost_messages(
        self,
        queue_of: Callable[[dict[str, str]], str],
        unacked_key: str,
        grace_s: float,
        only: Sequence[str] | None = None,
        limit: int = LOST_CANDIDATES,
        window: int = LOST_WINDOW,
    ) -> list[tuple[str, dict[str, str]]]:
        """Queued jobs whose message can no longer be anywhere, with their records: a
        worker took it off its queue and died before kombu entered it in the unacked
        hash (``unacked_key``). Such a job is queued, its last event a send (its own
        creation, or the reaper's: no start since) more than ``grace_s`` ago (a message
        sent after its record has had time to arrive), and its message is neither in
        the unacked hash nor among the ``window`` oldest messages of its queue
        (``queue_of`` names it from the record); when the queue is longer than that,
        the job must also have been sent ``grace_s`` before the earliest message read,
        so that its message cannot be among the newer ones. Looks at most ``limit`` jobs,
        those sent longest ago first (``only``: just those ids, to confirm a first
        look). One script reads the unacked hash and the queues at one instant, so a
        message on its way from a queue into the unacked hash is missed only while a
        worker is between the two (milliseconds: the reaper looks twice).

        Jobs whose dispatch deadline is less than a lease away are left to it: the
        deadline sends them within a lease anyway."""
        t = time.time()
        durable = self.sync.durable
        if only is None:
            # Running jobs hold leases of at most ``lease_s`` from now; above that sit
            # the queued jobs' dispatch deadlines (and put-back jobs' backoffs).
            raw = durable.zrangebyscore(
                self.keys.job_deadlines(), t + self.settings.lease_s, "+inf", start=0, num=limit
            )
            ids = [text_of(i) for i in raw]
        else:
            ids = list(only)
        if not ids:
            return []
        fields = (
            "status",
            "model",
            "revision",
            "scan",
            "created_at",
            "dispatched_at",
            "attempts",
            "dispatch_attempts",
            "dispatches",
            "key",
            "text",
            "premise",
            "tenant",
        )
        pipe = durable.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), *fields)
        suspects: dict[str, tuple[dict[str, str], float, str]] = {}
        for job_id, got in zip(ids, pipe.execute(), strict=True):
            record = {f: text_of(v) for f, v in zip(fields, got, strict=True) if v is not None}
            if record.get("status") != JobStatus.QUEUED or not record.get("model"):
                continue
            # Started since its last send (then put back by ``release``, or running
            # under a lease): its message was taken and acknowledged, not lost.
            if record.get("attempts", "0") != record.get("dispatch_attempts", "0"):
                continue
            sent = float(record.get("dispatched_at") or record.get("created_at") or t)
            if sent < t - grace_s:
                suspects[job_id] = (record, sent, queue_of(record))
        if not suspects:
            return []
        queues = list(dict.fromkeys(q for _, _, q in suspects.values()))
        held_raw, seen_raw = durable.eval(
            _WHERE_MESSAGES_ARE,
            1 + len(queues),
            unacked_key,
            *queues,
            window,
            self.keys.job_prefix(),
        )
        held = {text_of(x) for x in held_raw}
        seen: dict[str, tuple[int, float | None, set[str]]] = {}
        for queue, (length, earliest, tokens) in zip(queues, seen_raw, strict=True):
            first = float(text_of(earliest)) if earliest else None
            seen[queue] = (int(length), first, {text_of(x) for x in tokens})
        lost = []
        for job_id, (record, sent, queue) in suspects.items():
            length, earliest, tokens = seen[queue]
            names = {job_id}
            if record.get("scan"):
                scan = record["scan"]
                names |= {f"chunk:{scan}:{record.get('created_at', '')}", f"chunkscan:{scan}"}
            if names & (held | tokens):
                continue
            if length > window and (earliest is None or sent >= earliest - grace_s):
                continue  # its message may be among the newer ones, not read
            lost.append((job_id, record))
        return lost

    def claim_lost(self, job_id: str, record: dict[str, str]) -> bool:
        """Atomically take a job ``lost_messages`` found (as ``record`` shows it) for
        sending again: one more dispatch, a new dispatch deadline. False when anything
        happened to it since (started, sent, finished): then nothing is to be sent."""
        return self._claim(
            _CLAIM_LOST, job_id, record.get("attempts", "0"), record.get("dispatches", "0")
        )

    async def acancel(
        self, job_id: str, read: Read | None = None
    ) -> tuple[str, str, list[Hook]] | None:
        """Cancel a queued job nobody else joined (it fails as "cancelled" and its key
        is free again); a joined one is left for its other waiters ("detached"), a
        running or finished one is left to finish, its verdict cached ("unchanged").
        A handle (another key's share in a job) is cancelled alone while the job is
        queued. Returns (outcome, status, the webhooks taken: the caller sends them),
        or None when the job is unknown. ``read``: the job as ``aread`` just gave it
        (the API checked its owner), which spares reading it again."""
        if read is not None:
            if read.computed_by != job_id:
                return await self._acancel(job_id, {"handle_of": read.computed_by})
            return await self._acancel(job_id, {"key": read.key} if read.key else {})
        got = await self.aio.durable.hmget(self.keys.job(job_id), "key", "handle_of")
        record = {n: text_of(v) for n, v in zip(("key", "handle_of"), got, strict=True) if v}
        return await self._acancel(job_id, record)

    async def _acancel(
        self, job_id: str, record: dict[str, str]
    ) -> tuple[str, str, list[Hook]] | None:
        k = self.keys
        if record.get("handle_of"):
            reply = await self.aio.durable.eval(
                _CANCEL_HANDLE,
                2,
                k.job(job_id),
                k.job_hooks(job_id),
                k.job_prefix(),
                now(),
                k.done_channel(),
                job_id,
            )
        elif record.get("key"):
            keys = self._ending_keys(job_id, record["key"], k.job(job_id))
            reply = await self.aio.durable.eval(
                _CANCEL,
                len(keys),
                *keys,
                job_id,
                now(),
                self.settings.job_ttl_s,
                k.done_channel(),
            )
        else:
            return None
        outcome, status, hooks = reply
        if text_of(outcome) == "gone":
            return None
        return text_of(outcome), text_of(status), [Hook.decode(h) for h in hooks]

    def is_shared(self, job_id: str) -> bool:
        """True while another submission (interactive, or another scan) shares the job."""
        return int(self.sync.durable.hget(self.keys.job(job_id), "shared") or 0) > 0

    async def aadmission(self) -> tuple[int, int]:
        """(unfinished interactive jobs, image bytes held for them): what load shedding
        measures. Scans' jobs are not counted: their own admission bounds them."""
        pipe = self.aio.durable.pipeline(transaction=False)
        pipe.zcard(self.keys.job_pending_interactive())
        pipe.hget(self.keys.held_bytes(), "interactive_bytes")
        pending, held = await pipe.execute()
        return int(pending), int(held or 0)

    async def aheld(self) -> tuple[int, dict[str, int]]:
        """(unfinished interactive jobs, image bytes held by class) for /metrics."""
        pipe = self.aio.durable.pipeline(transaction=False)
        pipe.zcard(self.keys.job_pending_interactive())
        pipe.hgetall(self.keys.held_bytes())
        pending, raw = await pipe.execute()
        held = {k.removesuffix("_bytes"): int(v) for k, v in decode_hash(raw).items()}
        return int(pending), held

    def held(self) -> dict[str, int]:
        """Image bytes held for unfinished jobs, by class (``interactive``, ``bulk``)."""
        raw = decode_hash(self.sync.durable.hgetall(self.keys.held_bytes()))
        return {k.removesuffix("_bytes"): int(v) for k, v in raw.items()}

    async def ain_flight(self, key: str) -> bool:
        """Whether a job computing ``key`` exists (a submission would join it)."""
        return bool(await self.aio.durable.exists(self.keys.inflight(key)))

    def _queue_backlog(self, pipe: Any) -> None:
        pipe.zcard(self.keys.job_pending())
        pipe.zcount(self.keys.job_deadlines(), "-inf", time.time())
        pipe.zrange(self.keys.job_pending(), 0, 0, withscores=True)

    @staticmethod
    def _backlog_of(replies: list[Any]) -> tuple[int, int, float | None]:
        pending, overdue, oldest = replies
        return int(pending), int(overdue), float(oldest[0][1]) if oldest else None

    def backlog(self) -> tuple[int, int, float | None]:
        """(unfinished jobs, jobs past their deadline, creation time of the oldest)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        self._queue_backlog(pipe)
        return self._backlog_of(pipe.execute())

    async def abacklog(self) -> tuple[int, int, float | None]:
        """``backlog`` for the API's event loop (its /metrics)."""
        pipe = self.aio.durable.pipeline(transaction=False)
        self._queue_backlog(pipe)
        return self._backlog_of(await pipe.execute())

    # -- reading ---------------------------------------------------------------------

    @staticmethod
    def announcements(data: Any) -> list[tuple[str, str]]:
        """A message on the done channel: for each job it announces (one line each: the
        jobs a call finished together come in one message), the finished job's id and
        the rest. A finish sends the job's final record after the id, as JSON
        (``announced_record``), so that a waiting request needs no read; a
        cancellation sends the id alone (the rest is ""). The id comes first, so a
        listener waiting for other jobs, or wanting ids only, parses no JSON."""
        out = []
        for line in text_of(data).split("\n"):
            job_id, _, rest = line.partition(" ")
            out.append((job_id, rest))
        return out

    @staticmethod
    def announced_record(rest: str) -> dict[str, str] | None:
        """The record in the rest of an announcement, or None when there is none."""
        flat = json.loads(rest) if rest else None
        return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None

    def job_of(self, job_id: str, record: dict[str, str]) -> Job:
        """The job a record (as ``announced_record`` gives it) describes."""
        return self._decode(job_id, record)

    def _decode(self, job_id: str, raw: dict[Any, Any]) -> Job:
        fields = decode_hash(raw)

        def num(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        verdict = fields.get("verdict")
        return Job(
            job_id=job_id,
            status=JobStatus(fields.get("status") or JobStatus.QUEUED),
            cached=fields.get("cached") == "1",
            created_at=num("created_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            verdict=Verdict.model_validate_json(verdict) if verdict else None,
            error=fields.get("error"),
        )

    def get(self, job_id: str) -> Job | None:
        """The job (a handle shows the job it follows), or None when unknown or
        expired."""
        raw = decode_hash(self.sync.durable.hgetall(self.keys.job(job_id)))
        of = raw.get("handle_of") if "status" not in raw else None
        if of:
            followed = decode_hash(self.sync.durable.hgetall(self.keys.job(of)))
            raw = self._as_handle(raw, followed)
        return self._decode(job_id, raw) if raw else None

    async def aget(self, job_id: str) -> Job | None:
        """The job (a handle shows the job it follows), or None when unknown or
        expired."""
        got = await self.aread(job_id)
        return got.job if got is not None else None

    async def aread(self, job_id: str) -> Read | None:
        """The job as ``aget`` shows it, with its owner and the id of the job computing
        it (announced on the done channel when it ends); None when unknown or expired.
        One read, two for a handle whose job has not ended."""
        raw = decode_hash(await self.aio.durable.hgetall(self.keys.job(job_id)))
        if not raw:
            return None
        owner = raw.get("owner")
        of = raw.get("handle_of")
        if of and "status" not in raw:
            followed = decode_hash(await self.aio.durable.hgetall(self.keys.job(of)))
            raw = self._as_handle(raw, followed)
            if not raw:
                return None
        return Read(self._decode(job_id, raw), owner, of or job_id, raw.get("key"))

    @staticmethod
    def _as_handle(handle: dict[str, str], followed: dict[str, str]) -> dict[str, str]:
        """A handle's record shown with the state of the job it follows ({} when that
        job is gone): the handle's own creation time, the job's progress."""
        if not followed:
            return {}
        return {**followed, "created_at": handle.get("created_at", "")}

    async def acached(self, key: str) -> bytes | None:
        """The cached verdict's JSON for ``key``, if any."""
        return bytes_of(await self.aio.cache.get(self.keys.verdict(key)))

    def cached_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Cached verdicts' JSON for those of ``keys`` that have one (one MGET)."""
        if not keys:
            return {}
        values = self.sync.cache.mget([self.keys.verdict(k) for k in keys])
        found = {k: bytes_of(v) for k, v in zip(keys, values, strict=True)}
        return {k: v for k, v in found.items() if v is not None}

    def outcomes(self, job_ids: Iterable[str]) -> list[Outcome]:
        """Each job's status, verdict, error and scan (one pipelined round trip)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), "status", "verdict", "error", "scan")
        fields = ("status", "verdict", "error", "scan")
        return [
            self.outcome_of({f: text_of(v) for f, v in zip(fields, got, strict=True) if v})
            for got in pipe.execute()
        ]

    @staticmethod
    def outcome_of(record: dict[str, str]) -> Outcome:
        """What a scan collects of a job's record (as read, or as announced): an empty
        record is a job gone."""
        status = record.get("status")
        return Outcome(
            JobStatus(status) if status else None,
            record.get("verdict"),
            record.get("error"),
            record.get("scan"),
        )

    def linger(self, finished: Iterable[tuple[str, str]]) -> None:
        """(key, job id) pairs whose outcome a scan has copied: expire them soon."""
        keys = [
            k for key, job_id in finished for k in (self.keys.job(job_id), self.keys.inflight(key))
        ]
        if keys:  # one command for the lot, not two per job
            self.sync.durable.eval(_EXPIRE_ALL, len(keys), *keys, SCAN_JOB_LINGER_S)

    def record_batch(self, items: int, batches: int = 1, busy_s: float = 0.0) -> None:
        """Count ``batches`` model passes of ``items`` items in all, which kept the
        device busy ``busy_s`` seconds (tests, benchmarks and /metrics read them)."""
        pipe = self.sync.durable.pipeline(transaction=False)
        pipe.hincrby(self.keys.batch_stats(), "batches", batches)
        pipe.hincrby(self.keys.batch_stats(), "items", items)
        if busy_s > 0:  # whole microseconds: HINCRBY, no float to round in Redis
            pipe.hincrby(self.keys.batch_stats(), "busy_us", round(busy_s * 1e6))
        pipe.execute()

    def batch_stats(self) -> dict[str, int]:
        """{"batches": n, "items": m, "busy_us": t} counted so far."""
        raw = decode_hash(self.sync.durable.hgetall(self.keys.batch_stats()))
        return {k: int(v) for k, v in raw.items()}

    async def abatch_stats(self) -> dict[str, int]:
        """``batch_stats`` for the API's event loop (its /metrics)."""
        raw = decode_hash(await self.aio.durable.hgetall(self.keys.batch_stats()))
        return {k: int(v) for k, v in raw.items()}
