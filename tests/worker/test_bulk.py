"""The bulk queue's consumer (``worker/bulk.py``) on a real broker: scan chunks on a
channel of their own, ``OFA_BULK_CHUNKS`` at a time on threads of their own and twice
that many held, each run by the registered task and acknowledged once done, with the
task events Celery would send; another model's work handed back, a message no handler
can run dropped. (The whole worker, with interactive jobs beside a scan's chunks:
``tests/e2e/test_jobs.py``.)"""

from __future__ import annotations

import time

from celery.exceptions import Reject

from shared.wire import TASK_ENTAIL, TASK_ENTAIL_CHUNK
from tests.worker.test_consumer_step import ConsumerHost, Gate, publish, wait_for
from tests.worker.test_consumer_step import host as host  # the fixture
from worker.bulk import BulkConsumer


def register(host: ConsumerHost, name: str, fn) -> None:
    """``fn`` as the app's task ``name`` (the worker registers its own in worker/app.py)."""

    def task(*args: object) -> object:
        return fn(*args)

    host.app.task(name=name, shared=False)(task)


def test_chunks_run_on_their_own_threads_and_twice_as_many_are_held(host, rdb):
    gate = Gate()
    register(host, TASK_ENTAIL_CHUNK, gate)
    step = BulkConsumer(host)
    assert (step.threads._max_workers, step.prefetch) == (2, 4)  # OFA_BULK_CHUNKS=2
    assert step.queue_name() == host.queue()
    ids = publish(host, 9)
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: gate.running == 2 and rdb.hlen(host.unacked_key) == 4)
        time.sleep(0.3)
        assert gate.running == 2 and rdb.hlen(host.unacked_key) == 4
        assert rdb.llen(host.queue()) == 9 - 4
        assert step.consumers[0].channel is not host.connection.default_channel
        gate.open()
        wait_for(lambda: len(gate.done) == 9 and rdb.hlen(host.unacked_key) == 0)
    finally:
        gate.open()
        host.halt()
        step.shutdown(host)
    assert gate.peak == 2
    assert all(name.startswith("bulk") for name in gate.threads)
    assert rdb.llen(host.queue()) == 0
    received = {e["uuid"]: e for e in host.events("task-received")}
    assert set(received) == set(ids)
    assert {e["name"] for e in received.values()} == {TASK_ENTAIL_CHUNK}
    assert {e["uuid"] for e in host.events("task-started")} == set(ids)
    succeeded = {e["uuid"]: e for e in host.events("task-succeeded")}
    assert set(succeeded) == set(ids)
    assert sorted(e["result"] for e in succeeded.values()) == [f"done {n}" for n in range(9)]
    assert all(e["runtime"] >= 0 for e in succeeded.values())


def test_another_models_chunk_goes_back_on_the_queue(host, rdb):
    """A task raising ``Reject(requeue=True)`` (``jobs.ensure_ours``): the message back
    on the queue, task-rejected sent; taken again, it runs."""
    tries: list[int] = []

    def chunk(n: int) -> str:
        tries.append(n)
        if len(tries) == 1:
            raise Reject("another model's", requeue=True)
        return "ran"

    register(host, TASK_ENTAIL_CHUNK, chunk)
    step = BulkConsumer(host)
    [task_id] = publish(host, 1)
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: len(host.events("task-succeeded")) == 1)
    finally:
        host.halt()
        step.shutdown(host)
    assert tries == [0, 0]
    [rejected] = host.events("task-rejected")
    assert (rejected["uuid"], rejected["requeue"]) == (task_id, True)
    assert [e["uuid"] for e in host.events("task-started")] == [task_id, task_id]
    assert rdb.llen(host.queue()) == 0 and rdb.hlen(host.unacked_key) == 0


def test_a_message_no_handler_can_run_is_dropped_not_retried(host, rdb):
    """A task that fails, and a task the bulk queue does not carry: each acknowledged
    once, reported failed, never run again."""
    calls: list[int] = []

    def chunk(n: int) -> str:
        calls.append(n)
        raise RuntimeError("a chunk that cannot be read")

    register(host, TASK_ENTAIL_CHUNK, chunk)
    register(host, "ofa.other", lambda n: calls.append(100 + n))
    step = BulkConsumer(host)
    [failing] = publish(host, 1)
    stranger = host.app.send_task("ofa.other", args=[1], queue=host.queue()).id
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: len(host.events("task-failed")) == 2)
        wait_for(lambda: rdb.hlen(host.unacked_key) == 0)
        time.sleep(0.3)  # nothing comes back
    finally:
        host.halt()
        step.shutdown(host)
    assert calls == [0]  # the stranger never ran; the failing one ran once
    failed = {e["uuid"]: e for e in host.events("task-failed")}
    assert set(failed) == {failing, stranger}
    assert "a chunk that cannot be read" in failed[failing]["exception"]
    assert "RuntimeError" in failed[failing]["traceback"]
    assert "no 'ofa.other' tasks" in failed[stranger]["exception"]
    assert not host.events("task-succeeded")
    assert rdb.llen(host.queue()) == 0


def test_a_scan_job_sent_again_runs_on_the_bulk_queue(host, rdb):
    """The reaper sends a lost scan job again on its own (``entail``, not a chunk): the
    bulk consumer runs it like a chunk."""
    ran: list[int] = []
    register(host, TASK_ENTAIL, lambda n: ran.append(n) or "job")
    step = BulkConsumer(host)
    task_id = host.app.send_task(TASK_ENTAIL, args=[7], queue=host.queue()).id
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: len(host.events("task-succeeded")) == 1)
    finally:
        host.halt()
        step.shutdown(host)
    assert ran == [7]
    [done] = host.events("task-succeeded")
    assert (done["uuid"], done["result"]) == (task_id, "job")
    assert rdb.hlen(host.unacked_key) == 0
