"""The reaper's view of jobs: the overdue ones, the vanished ones it drops from the
indexes, and the queued ones whose message is lost (``worker/reaper.py``).

Its re-sends go through ``JobStore.record`` and ``JobStore.claim_overdue`` (a
submission that joins an overdue job sends it again the same way) and ``claim_lost``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from shared.models import JobStatus
from shared.store.clients import Store
from shared.store.codec import text_of
from shared.store.scripts import Script

_WHERE_MESSAGES_ARE = Script("where_messages_are")
_CLAIM_LOST = Script("claim_lost")

# The look for lost messages: at most this many queued jobs a pass, and this many
# messages read at the old end of each queue (both bound the script's work: a few
# milliseconds of Valkey's time a pass at most).
LOST_CANDIDATES = 500
LOST_WINDOW = 1000


class JobReaping(Store):
    """What the reaper looks at: deadlines past, and messages lost."""

    def overdue(self, limit: int = 500) -> list[str]:
        """Unfinished jobs past their deadline, most overdue first."""
        ids = self.sync.durable.zrangebyscore(
            self.keys.job_deadlines(), "-inf", time.time(), start=0, num=limit
        )
        return [text_of(i) for i in ids]

    def forget(self, job_id: str) -> None:
        """Drop a finished or vanished job from the deadline indexes."""
        pipe = self.sync.durable.pipeline()
        pipe.zrem(self.keys.job_deadlines(), job_id)
        pipe.zrem(self.keys.job_pending(), job_id)
        pipe.execute()

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
            "store_waits",
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
        held_raw, seen_raw = _WHERE_MESSAGES_ARE(
            durable, [unacked_key, *queues], [window, self.keys.job_prefix()]
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
        t = time.time()
        deadline = t + self.settings.dispatch_deadline_s
        k = self.keys
        seen = [record.get("attempts", "0"), record.get("dispatches", "0")]
        return bool(
            _CLAIM_LOST(
                self.sync.durable, [k.job(job_id), k.job_deadlines()], [job_id, t, deadline, *seen]
            )
        )
