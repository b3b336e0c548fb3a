"""Celery's task events as the worker's own consumers send them (``worker/events.py``),
through a real Celery event dispatcher, on real messages from the test Valkey."""

from __future__ import annotations

from types import SimpleNamespace

from kombu import Queue

from shared.wire import TASK_ENTAIL_CHUNK
from tests.worker.test_consumer_step import ConsumerHost, publish
from tests.worker.test_consumer_step import host as host  # the fixture
from worker.events import dropped, handed_back, received_event, task_event


def take(host: ConsumerHost):
    """One message off the host's queue, unacknowledged (a kombu ``Message``)."""
    channel = host.connection.channel()
    message = Queue(host.queue())(channel).get(no_ack=False, accept=["json"])
    assert message is not None
    return message


def test_events_go_out_only_when_enabled(host):
    task_event(host, "task-started", "t1")
    host.event_dispatcher.enabled = False
    task_event(host, "task-started", "t2")
    task_event(SimpleNamespace(), "task-started", "t3")  # a consumer with no dispatcher
    assert [(e["type"], e["uuid"]) for e in host.events()] == [("task-started", "t1")]


def test_received_carries_what_the_headers_say(host):
    [task_id] = publish(host, 1)
    message = take(host)
    received_event(host, message.headers)
    [event] = host.events("task-received")
    assert event["uuid"] == task_id
    assert event["name"] == TASK_ENTAIL_CHUNK
    assert event["args"] == message.headers["argsrepr"] == "[0]"
    assert event["retries"] == 0
    assert (event["eta"], event["expires"]) == (None, None)
    message.ack()


def test_handed_back_puts_the_message_back_and_says_so(host, rdb):
    [task_id] = publish(host, 1)
    message = take(host)
    assert rdb.llen(host.queue()) == 0
    handed_back(host, message, task_id)
    assert rdb.llen(host.queue()) == 1  # back on its queue
    [event] = host.events("task-rejected")
    assert (event["uuid"], event["requeue"]) == (task_id, True)

    again = take(host)
    handed_back(host, again, task_id, requeue=False)
    assert rdb.llen(host.queue()) == 0 and rdb.hlen(host.unacked_key) == 0
    assert [e["requeue"] for e in host.events("task-rejected")] == [True, False]


def test_dropped_acknowledges_and_reports_the_failure(host, rdb):
    [task_id] = publish(host, 1)
    message = take(host)
    assert rdb.hlen(host.unacked_key) == 1
    try:
        raise ValueError("no handler for this")
    except ValueError as exc:
        dropped(host, message, task_id, exc)
    assert rdb.hlen(host.unacked_key) == 0 and rdb.llen(host.queue()) == 0
    [event] = host.events("task-failed")
    assert event["uuid"] == task_id
    assert event["exception"] == "ValueError('no handler for this')"
    assert "raise ValueError" in event["traceback"]
