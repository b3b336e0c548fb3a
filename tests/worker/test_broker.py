"""The broker seam (``worker/broker.py``): kombu's Redis channel as the worker's Celery
app patches it, on a real broker (the test Valkey) with real kombu consumers; the
version check; and the API's process, which never patches kombu."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Consumer, Message, Producer, Queue

from worker import broker as seam

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(inproc_settings, rdb) -> Iterator[tuple[Connection, Queue]]:
    """A connection (with the worker's patches applied) and a queue of 7 messages."""
    app = seam.worker_celery(inproc_settings)
    run = uuid.uuid4().hex
    # Unacked keys of its own: the session's worker and coordinator (the same Valkey)
    # hold messages in kombu's shared ones meanwhile.
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "unacked_key": f"unacked.test.{run}",
        "unacked_index_key": f"unacked_index.test.{run}",
        "unacked_mutex_key": f"unacked_mutex.test.{run}",
    }
    queue = Queue(f"ofa.test.take.{run}")
    with app.connection_for_read() as conn:
        with Producer(conn.default_channel) as producer:
            for n in range(7):
                producer.publish({"n": n}, routing_key=queue.name, declare=[queue])
        yield conn, queue
    rdb.delete(queue.name, f"unacked.test.{run}", f"unacked_index.test.{run}")


def consume(conn: Connection, queue: Queue, prefetch: int, callback) -> Consumer:
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    consumer = Consumer(channel, queues=[queue], callbacks=[callback], accept=["json"])
    consumer.consume()
    return consumer


def test_a_turn_takes_every_waiting_message_up_to_the_free_prefetch(broker, rdb):
    conn, queue = broker
    got: list[tuple[int, Message]] = []
    consumer = consume(conn, queue, 5, lambda body, m: got.append((body["n"], m)))
    conn.drain_events(timeout=5)  # one turn of the event loop
    assert [n for n, _ in got] == [0, 1, 2, 3, 4]  # in order, as many as the prefetch
    assert rdb.llen(queue.name) == 2
    unacked = consumer.channel.unacked_key
    assert rdb.hlen(unacked) == 5  # each one entered in the unacked index
    for _, message in got:
        message.ack()
    conn.drain_events(timeout=5)
    assert [n for n, _ in got] == list(range(7)) and rdb.llen(queue.name) == 0


def test_messages_taken_but_not_handed_over_go_back_in_order(broker, rdb):
    conn, queue = broker
    got: list[int] = []

    def handle(body: dict, message: Message) -> None:
        if body["n"] == 2 and 2 not in got:
            got.append(2)
            raise RuntimeError("a consumer that fails")
        got.append(body["n"])
        message.ack()

    consume(conn, queue, 10, handle)
    with pytest.raises(RuntimeError):
        conn.drain_events(timeout=5)
    assert got == [0, 1, 2]
    assert rdb.llen(queue.name) == 4  # 3, 4, 5 and 6, back on the list
    conn.drain_events(timeout=5)
    assert got == [0, 1, 2, 3, 4, 5, 6]  # in their order


def commands_while(rdb, action) -> list[list[str]]:
    """The commands Valkey ran while ``action`` did (MONITOR), up to a marker."""
    marker = f"end-{uuid.uuid4().hex}"
    seen: list[list[str]] = []
    with rdb.monitor() as monitor:
        action()
        rdb.echo(marker)
        for event in monitor.listen():
            words = event["command"].split()
            if marker in event["command"]:
                return seen
            seen.append(words)
    raise AssertionError("the marker never came")


def test_messages_taken_together_are_entered_unacked_in_one_write(broker, rdb):
    conn, queue = broker
    got: list[Message] = []
    consumer = consume(conn, queue, 5, lambda body, m: got.append(m))
    commands = commands_while(rdb, lambda: conn.drain_events(timeout=5))
    tags = {m.delivery_tag for m in got}
    assert len(tags) == 5
    # Before: a MULTI per message, each a ZADD and an HSET of one tag.
    adds = [c for c in commands if c[0].upper() == "ZADD"]
    assert len(adds) == 1 and tags <= set(adds[0])
    entries = rdb.hgetall(consumer.channel.unacked_key)
    assert {k.decode() for k in entries} == tags
    assert rdb.zcard(consumer.channel.unacked_index_key) == 5
    for m in got:
        m.ack()
    assert rdb.hlen(consumer.channel.unacked_key) == 0


def test_messages_consumed_without_acknowledgement_leave_no_unacked_entry(broker, rdb):
    conn, queue = broker
    got: list[int] = []
    channel = conn.channel()
    channel.basic_qos(0, 4, False)
    consumer = Consumer(
        channel, queues=[queue], callbacks=[lambda b, m: got.append(b["n"])], no_ack=True
    )
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(got) > 1 and got == list(range(len(got)))  # taken together
    assert rdb.hlen(channel.unacked_key) == 0 and rdb.zcard(channel.unacked_index_key) == 0


def test_a_failed_delivery_leaves_entries_only_for_what_was_handed_over(broker, rdb):
    conn, queue = broker
    handed: list[Message] = []

    def handle(body: dict, message: Message) -> None:
        handed.append(message)
        if body["n"] == 1:
            raise RuntimeError("a consumer that fails")

    consumer = consume(conn, queue, 10, handle)
    with pytest.raises(RuntimeError):
        conn.drain_events(timeout=5)
    entries = {k.decode() for k in rdb.hgetall(consumer.channel.unacked_key)}
    assert entries == {m.delivery_tag for m in handed}  # 0 and 1; 2-6 back on the list
    assert rdb.llen(queue.name) == 5


def test_the_worker_app_is_patched_and_runs_our_consumer(inproc_settings):
    from kombu.transport.redis import Channel, QoS

    app = seam.worker_celery(inproc_settings)
    assert app.conf.worker_consumer == "worker.broker:BatchedEventsConsumer"
    patched = (QoS.append, QoS.ack, Channel._brpop_read, Channel._create_client)
    assert all(f.__module__ == "worker.broker" for f in patched)
    seam.install_patches()  # again: nothing wrapped twice
    assert (QoS.append, QoS.ack, Channel._brpop_read, Channel._create_client) == patched


def test_the_api_leaves_kombu_as_kombu_ships_it(valkey):
    """The API's process builds its Celery app (``api.deps.Services.build``, through the
    app's lifespan) and never imports the seam: kombu's methods stay kombu's own."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from kombu.transport.redis import Channel, QoS
from kombu.transport.virtual.base import QoS as VirtualQoS
from api.app import create_app
from shared.settings import Settings

def kombus():
    return [QoS.append, QoS.ack, QoS.reject, VirtualQoS.restore_unacked_once,
            Channel._brpop_read, Channel._create_client]

before = kombus()
assert all(f.__module__.startswith("kombu.") for f in before), before
app = create_app(Settings(_env_file=None, redis_url={valkey!r}))
with TestClient(app):
    assert app.state.services.celery is not None
    assert kombus() == before
assert not [m for m in sys.modules if m == "worker" or m.startswith("worker.")]
print("unpatched")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("unpatched")


def test_other_kombu_or_celery_releases_are_refused_with_what_to_do():
    seam.check_versions(seam.KOMBU_VERSION, seam.CELERY_VERSION)
    with pytest.raises(RuntimeError) as kombu_differs:
        seam.check_versions("5.8.0", seam.CELERY_VERSION)
    said = str(kombu_differs.value)
    assert f"kombu {seam.KOMBU_VERSION} and Celery {seam.CELERY_VERSION}" in said
    assert f"kombu 5.8.0 and Celery {seam.CELERY_VERSION} are installed" in said
    assert "requirements/worker.txt" in said and "tests/worker/test_broker.py" in said
    with pytest.raises(RuntimeError, match=r"kombu 5\.7\.0 and Celery 5\.6\.3 are installed"):
        seam.check_versions("5.7.0", "5.6.3")


def test_the_checked_versions_are_the_locked_ones():
    """What the seam checks at import is what pyproject pins and the worker's lock
    installs."""
    from tests.test_lock import declared, read_lock

    pins = {r.name: str(r.specifier) for r in declared([]) if r.name in ("kombu", "celery")}
    assert pins == {"kombu": f"=={seam.KOMBU_VERSION}", "celery": f"=={seam.CELERY_VERSION}"}
    locked = read_lock("worker")
    assert str(locked["kombu"][0]) == seam.KOMBU_VERSION
    assert str(locked["celery"][0]) == seam.CELERY_VERSION
