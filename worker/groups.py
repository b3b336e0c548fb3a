"""Interactive messages taken by Celery's consumer, handled in groups.

Each interactive job is still its own Celery message on the interactive queue, taken
by Celery's own consumer (its channel, prefetch, reconnection). What changes is what
happens to a message once taken. Celery's pool would make a ``Request`` and give it a
thread of its own, which ran the job's start script, waited for the batcher, and ran
its finish script and acknowledgement, each a round trip. Here the ``ofa.entail``
task's strategy puts the message on a local queue, and a few threads each take
everything waiting there (up to a batch) as one group: the jobs taken in one round
trip and handed to the batcher together (``jobs.submit_many``). No thread waits for
the model: when the group's last item is scored, the group comes back on the same
queue, and a thread records every verdict in one round trip (``jobs.finish_many``)
and acknowledges every message in another. Under load that divides the per-job cost
of the worker's plumbing by the group's size; a lone message is a group of one and
waits for nothing.

Like an ``acks_late`` task, a message is acknowledged once its job is recorded; a
worker that dies leaves it to the visibility timeout and its job to the reaper. A
group the model has not answered within the task's soft time limit goes back to
queued, as a task's wait would. The task events Celery would send (received,
started, succeeded with the verdict's summary, failed, rejected) are sent here, so
Flower lists every job. A worker that stops finishes the groups it holds and hands
back the messages it has not started.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from typing import Any, NamedTuple

from celery import bootsteps
from celery.exceptions import Reject
from pydantic import ValidationError

from shared import tracing
from shared.settings import get_settings
from shared.wire import EntailTask
from worker import jobs
from worker.broker import Message, ack_together
from worker.events import dropped, handed_back, received_event, task_event
from worker.runtime import get_runtime

logger = logging.getLogger(__name__)

# Threads running groups: enough that one group prepares while others wait for the
# batcher or for Redis, and that image preparation (in these threads unless
# OFA_PREPROCESS_PROCESSES is set) uses every core; few enough that messages arriving
# while they are busy gather into groups instead of each waking a thread of its own.
GROUP_THREADS = max(4, 2 * (os.cpu_count() or 1))
OVERDUE_CHECK_S = 1.0


class Taken(NamedTuple):
    message: Message
    task_id: str
    started: float


class HandedGroup:
    """A group handed to the batcher: its messages, and its jobs until recorded."""

    def __init__(self, taken: list[Taken], msgs: list[EntailTask], jobs: jobs.ScoringGroup) -> None:
        self.taken = taken
        self.msgs = msgs
        self.jobs = jobs
        self.left = len(jobs.waiting)  # items the batcher has still to answer
        self.deadline = time.monotonic() + get_settings().task_soft_time_limit_s


class Groups:
    """The local queue of taken interactive messages (and of groups the batcher has
    answered), and the threads that run them."""

    def __init__(self, consumer: Any, max_group: int, threads: int = GROUP_THREADS) -> None:
        self.consumer = consumer
        self.max_group = max_group
        self.open = True
        self._queue: queue.SimpleQueue[Taken | HandedGroup | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._handed: dict[int, HandedGroup] = {}  # handed to the batcher, not yet answered
        self._busy = 0  # threads between taking work and finishing it
        self._overdue_check_at = 0.0  # monotonic time of the next look for late groups
        self._threads = [
            threading.Thread(target=self._loop, name=f"interactive-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, taken: Taken) -> None:
        self._queue.put(taken)

    def close(self, timeout: float) -> None:
        """Run what is queued and in group (up to ``timeout``), then stop the threads."""
        self.open = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._handed and not self._busy and self._queue.empty():
                    break
            time.sleep(0.02)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=OVERDUE_CHECK_S)
            except queue.Empty:
                self._finish_overdue()
                continue
            if first is None:
                return
            with self._lock:
                self._busy += 1
            try:
                self._work(first)
            except Exception:  # never lose the thread: the messages come back unacked
                logger.exception("interactive messages failed")
            finally:
                with self._lock:
                    self._busy -= 1

    def _work(self, first: Taken | HandedGroup) -> None:
        """A group of the new messages waiting (up to ``max_group``) started, and every
        answered group waiting finished together (a batch's items are answered at
        once, so their groups are recorded and acknowledged in one round trip each)."""
        group: list[Taken] = []
        answered: list[HandedGroup] = []
        item: Taken | HandedGroup | None = first
        while True:
            if isinstance(item, HandedGroup):
                answered.append(item)
            elif isinstance(item, Taken):
                group.append(item)
                if len(group) >= self.max_group:
                    break
            else:  # a sentinel: the next thread's to take
                self._queue.put(None)
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if answered:
            self._finish(answered, 0.0)
        if group:
            try:
                self._start(group)
            except Exception:
                # Unexpected: hand the messages back rather than hold them (and their
                # prefetch slots) unacknowledged; their jobs are idempotent.
                logger.exception("a group of %d interactive messages failed", len(group))
                for taken in group:
                    if not taken.message.acknowledged:
                        with contextlib.suppress(Exception):
                            taken.message.reject(requeue=True)
        self._finish_overdue()

    def _start(self, group: list[Taken]) -> None:
        rt = get_runtime(get_settings(), self.consumer.app)
        taken_ok: list[Taken] = []
        msgs: list[EntailTask] = []
        for taken in group:
            task_event(self.consumer, "task-started", taken.task_id)
            try:
                args, kwargs, _ = taken.message.decode()  # Celery's protocol 2
                msg = EntailTask.model_validate(args[0] if args else kwargs["msg"])
                jobs.ensure_ours(rt, msg.model, msg.revision)
            except Reject as exc:  # another model's job: back on the queue
                handed_back(self.consumer, taken.message, taken.task_id, bool(exc.requeue))
                continue
            except (ValidationError, ValueError, TypeError, KeyError, IndexError) as exc:
                # A message no worker can ever run: failed, not retried.
                logger.error("dropped an invalid ofa.entail message %s: %s", taken.task_id, exc)
                dropped(self.consumer, taken.message, taken.task_id, exc)
                continue
            taken_ok.append(taken)
            msgs.append(msg)
        if not msgs:
            return
        # With tracing on, each job continues the trace its message's headers carry.
        headers = [t.message.headers for t in taken_ok] if tracing.on() else None
        handed = HandedGroup(taken_ok, msgs, jobs.submit_many(rt, msgs, 0, headers))
        if not handed.left:  # nothing for the model (cached, finished, failed)
            self._finish([handed], 0.0)
            return
        with self._lock:
            self._handed[id(handed)] = handed
        answered = functools.partial(self._answered, handed)
        for _, _, future in handed.jobs.waiting:
            future.add_done_callback(answered)

    def _answered(self, group: HandedGroup, _: object) -> None:
        """In the batcher's thread, as each item is answered: the group back on the
        queue once all are (only one caller gets it out of ``_handed``)."""
        with self._lock:
            group.left -= 1
            if group.left > 0 or self._handed.pop(id(group), None) is None:
                return
        self._queue.put(group)

    def _finish_overdue(self) -> None:
        """Finish the groups past their deadline; looked for at most once a second
        (deadlines are the soft time limit: whole seconds)."""
        now = time.monotonic()
        if now < self._overdue_check_at:
            return
        self._overdue_check_at = now + OVERDUE_CHECK_S
        with self._lock:
            late = [f for f in self._handed.values() if f.deadline <= now]
            for group in late:
                del self._handed[id(group)]
        if late:
            logger.warning("%d interactive jobs unanswered in time", sum(len(f.msgs) for f in late))
            self._finish(late, 0.0)

    def _finish(self, groups: list[HandedGroup], timeout: float) -> None:
        rt = get_runtime(get_settings(), self.consumer.app)
        outcomes = jobs.finish_many(rt, [f.jobs for f in groups], timeout)
        ack_together([taken.message for f in groups for taken in f.taken])
        for group, theirs in zip(groups, outcomes, strict=True):
            for taken, msg, outcome in zip(group.taken, group.msgs, theirs, strict=True):
                task_event(
                    self.consumer,
                    "task-succeeded",
                    taken.task_id,
                    result=jobs.summary(outcome, msg.job_id),
                    runtime=time.monotonic() - taken.started,
                )


def grouped(task: Any, app: Any, consumer: Any, **_: Any) -> Any:
    """The ``ofa.entail`` task's strategy (``Task.Strategy``): on the consumer's event
    loop, announce the message and queue it for the group threads."""

    def handler(message: Message, body: Any, ack: Any, reject: Any, callbacks: Any) -> None:
        headers = message.headers or {}
        task_id = str(headers.get("id", ""))
        received_event(consumer, headers)
        groups: Groups | None = getattr(consumer, "ofa_groups", None)
        if groups is None or not groups.open:  # stopping: another worker takes it
            handed_back(consumer, message, task_id)
            return
        groups.put(Taken(message, task_id, time.monotonic()))

    return handler


class InteractiveGroups(bootsteps.StartStopStep):
    """Owns the consumer's ``Groups``: made when the consumer starts, and closed
    (queued groups run and acknowledged) when it stops or restarts."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        c.ofa_groups = None

    def start(self, c: Any) -> None:
        tracing.configure(get_settings(), "ofa-entail-worker")
        if c.ofa_groups is None or not c.ofa_groups.open:
            c.ofa_groups = Groups(c, get_settings().batch_size)

    def stop(self, c: Any) -> None:
        groups, c.ofa_groups = c.ofa_groups, None
        if groups is not None:
            groups.close(get_settings().task_soft_time_limit_s)

    def shutdown(self, c: Any) -> None:
        self.stop(c)
