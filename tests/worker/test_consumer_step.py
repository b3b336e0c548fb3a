"""The threaded consumer step (``worker/consumer_step.py``) on a real broker (the test
Valkey) with the worker's Celery app: its own channel, ``threads`` messages running at
a time on threads of its own and twice that many held, undecodable messages dropped,
and a stop that lets the running work finish and puts what was held back on the queue.

The step runs as Celery's consumer runs it (``start``, then the connection's event loop
turned, then ``stop``); what stands in for Celery's consumer is only the holder of the
app, the connection and the event dispatcher the step reads (``ConsumerHost``)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery

from shared.wire import TASK_ENTAIL_CHUNK, queue_name
from worker import broker as seam
from worker import consumer_step
from worker.broker import Message
from worker.consumer_step import ThreadedConsumerStep


@dataclass
class ConsumerHost:
    """What a consumer step reads of Celery's consumer: the app, the broker connection
    and the event dispatcher (task events buffered, as a worker with an event loop
    buffers them, so a test reads what was sent)."""

    app: Celery
    connection: Any
    event_dispatcher: Any
    settings: Any
    unacked_key: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _loop: threading.Thread | None = None

    def queue(self) -> str:
        """The bulk queue of this host's (own) model."""
        return queue_name(*self.settings.model_tag, bulk=True)

    def turn(self) -> None:
        """Turn the connection's event loop in a thread, as the worker's loop does."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.connection.drain_events(timeout=0.1)
                except TimeoutError:
                    continue

        self._stop.clear()
        self._loop = threading.Thread(target=run, daemon=True)
        self._loop.start()

    def halt(self) -> None:
        """Stop turning the event loop."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=5)
            self._loop = None

    def events(self, kind: str | None = None) -> list[dict]:
        """The task events sent so far (of ``kind``)."""
        sent = list(self.event_dispatcher._group_buffer["task"])
        return [e for e in sent if kind is None or e["type"] == kind]


@pytest.fixture
def host(inproc_settings, rdb, monkeypatch) -> Iterator[ConsumerHost]:
    """A worker app on a model of its own (its own bulk queue) with 2 bulk threads, and
    unacked keys of its own (the session's processes use kombu's shared ones)."""
    run = uuid.uuid4().hex[:8]
    settings = inproc_settings.model_copy(update={"model": f"steps-{run}", "bulk_chunks": 2})
    from worker import bulk

    monkeypatch.setattr(consumer_step, "get_settings", lambda: settings)
    monkeypatch.setattr(bulk, "get_settings", lambda: settings)
    app = seam.worker_celery(settings)
    unacked_key = f"unacked.test.{run}"
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "unacked_key": unacked_key,
        "unacked_index_key": f"unacked_index.test.{run}",
        "unacked_mutex_key": f"unacked_mutex.test.{run}",
    }
    with app.connection_for_read() as conn:
        dispatcher = app.events.Dispatcher(
            conn, hostname=f"test@{run}", enabled=True, buffer_group={"task"}, buffer_limit=10**6
        )
        h = ConsumerHost(app, conn, dispatcher, settings, unacked_key)
        yield h
        h.halt()
        dispatcher.close()
    rdb.delete(h.queue(), unacked_key, f"unacked_index.test.{run}")


class Gate:
    """Work that waits for ``open()``, counting how much runs at once and on which
    threads."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.done: list[Any] = []
        self.threads: set[str] = set()

    def __call__(self, n: Any) -> str:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            assert self.opened.wait(30)
            return f"done {n}"
        finally:
            with self.lock:
                self.running -= 1
                self.done.append(n)

    def open(self) -> None:
        self.opened.set()


def wait_for(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


class Step(ThreadedConsumerStep):
    """The smallest step: each message's body handed to ``work`` on a thread, then
    acknowledged."""

    what = "test messages"
    work: Callable[[Any], Any]

    def __init__(self, c: Any, threads: int, work: Callable[[Any], Any]) -> None:
        super().__init__(c, threads, "step")
        self.work = work

    def queue_name(self) -> str:
        return queue_name(*self.settings.model_tag, bulk=True)

    def _received(self, body: Any, message: Message) -> None:
        self._submit(self._run, body, message)

    def _run(self, body: Any, message: Message) -> None:
        self.work(body[0][0])  # Celery's protocol 2: (args, kwargs, embed)
        message.ack()


def publish(host: ConsumerHost, count: int) -> list[str]:
    """``count`` messages on the host's bulk queue, as ``send_task`` writes them."""
    return [
        host.app.send_task(TASK_ENTAIL_CHUNK, args=[n], queue=host.queue()).id for n in range(count)
    ]


def test_threads_run_at_a_time_and_twice_as_many_are_held(host, rdb):
    gate = Gate()
    step = Step(host, 3, gate)
    assert step.prefetch == 6
    publish(host, 14)
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: gate.running == 3 and rdb.hlen(host.unacked_key) == 6)
        time.sleep(0.3)  # nothing more is taken while the threads are busy
        assert gate.running == 3
        assert rdb.hlen(host.unacked_key) == 6  # held: twice the threads
        assert rdb.llen(host.queue()) == 14 - 6
        # Its own channel: not the connection's default one Celery's consumer uses.
        assert step.consumers[0].channel is not host.connection.default_channel
        gate.open()
        wait_for(lambda: len(gate.done) == 14)
        wait_for(lambda: rdb.hlen(host.unacked_key) == 0)  # each acknowledged
    finally:
        gate.open()
        host.halt()
        step.shutdown(host)
    assert gate.peak == 3
    assert all(name.startswith("step") for name in gate.threads)
    assert rdb.llen(host.queue()) == 0


def test_a_stop_finishes_the_running_work_and_puts_the_held_back(host, rdb):
    gate = Gate()
    step = Step(host, 2, gate)
    publish(host, 10)
    step.start(host)
    host.turn()
    wait_for(lambda: gate.running == 2 and rdb.hlen(host.unacked_key) == 4)
    host.halt()
    threading.Timer(0.5, gate.open).start()
    started = time.monotonic()
    step.stop(host)  # waits for the two running, then closes the channel
    assert time.monotonic() - started >= 0.4
    assert sorted(gate.done) == [0, 1]  # the running ones finished, acknowledged
    assert rdb.hlen(host.unacked_key) == 0
    assert rdb.llen(host.queue()) == 8  # six never taken, two held and put back
    step.threads.shutdown(wait=True)
    assert sorted(gate.done) == [0, 1]  # the held ones never ran here


def test_an_undecodable_message_is_dropped(host, rdb, caplog):
    from kombu import Producer

    gate = Gate()
    gate.open()
    step = Step(host, 2, gate)
    with Producer(host.connection.channel()) as producer:
        # A pickle: a content type the step does not accept.
        producer.publish(
            b"\x80\x04N.",
            routing_key=host.queue(),
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
    publish(host, 1)
    step.start(host)
    host.turn()
    try:
        wait_for(lambda: gate.done == [0])
        wait_for(lambda: rdb.llen(host.queue()) == 0 and rdb.hlen(host.unacked_key) == 0)
    finally:
        host.halt()
        step.shutdown(host)
    assert gate.done == [0]  # the undecodable one never reached the work
    assert any("dropped an undecodable message" in r.getMessage() for r in caplog.records)
