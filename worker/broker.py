"""The broker seam: every patch of, and reach into, kombu's and Celery's private parts,
applied only by the worker and the coordinator (``worker_celery``); the API and Flower
run the plain app (``shared/celery_app.py``). No other module imports kombu: the kombu
names the worker's modules need are re-exported here.

What is bent, and why:

- ``_tolerate_restore_after_connection_loss``, ``_tolerate_ack_on_a_closed_channel``:
  a broker restart must not hang or stop the worker;
- ``_reuse_the_channel_client``: one redis-py client per channel, not one per command;
- ``_take_every_waiting_message`` (with ``_skip_entered_appends``): a turn of the event
  loop takes every waiting message, entered in the unacked index in one write;
- ``ack_together``: a group's messages acknowledged in one round trip;
- ``BatchedEventsConsumer``: Celery's consumer, its task events flushed on a timer.

They restate or call internals of the exact releases in ``KOMBU_VERSION`` and
``CELERY_VERSION`` (pinned in pyproject.toml, locked in requirements/), checked when
this module is imported; ``tests/worker/test_broker.py`` runs them against a real
broker. Upgrading either package: re-read every function here against the new
release, run those tests, then move the versions here and the pins together.
"""

from __future__ import annotations

import logging
import time
from queue import Empty
from typing import Any

import celery
import kombu
import redis
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Consumer, Message
from kombu.exceptions import OperationalError
from kombu.transport.redis import Channel
from kombu.transport.redis import QoS as RedisQoS
from kombu.transport.virtual.base import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from shared.celery_app import make_celery
from shared.settings import Settings

__all__ = [
    "BatchedEventsConsumer",
    "Consumer",
    "Message",
    "OperationalError",
    "ack_together",
    "check_versions",
    "install_patches",
    "worker_celery",
]

logger = logging.getLogger(__name__)

# The releases this module was written against: requirements/worker.txt's pins.
KOMBU_VERSION = "5.7.0"
CELERY_VERSION = "5.7.0"


def check_versions(kombu_version: str, celery_version: str) -> None:
    """Refuse to run on kombu or Celery releases other than the ones these patches were
    written against: a patch that no longer fits fails quietly or corrupts the
    unacked index, so a mismatch stops the process at import instead."""
    if (kombu_version, celery_version) == (KOMBU_VERSION, CELERY_VERSION):
        return
    raise RuntimeError(
        f"worker/broker.py patches kombu {KOMBU_VERSION} and Celery {CELERY_VERSION}, "
        f"but kombu {kombu_version} and Celery {celery_version} are installed. Install "
        "the locked versions (pip install --no-deps --require-hashes -r "
        "requirements/worker.txt), or, to upgrade, re-read every patch in "
        "worker/broker.py against the new release, run tests/worker/test_broker.py, and "
        "then change KOMBU_VERSION / CELERY_VERSION there and the pins in pyproject.toml."
    )


check_versions(kombu.__version__, celery.__version__)


def worker_celery(settings: Settings) -> Celery:
    """The Celery app of a worker or coordinator process: ``make_celery``'s, kombu
    patched (``install_patches``), and Celery's consumer replaced by
    ``BatchedEventsConsumer``."""
    install_patches()
    app = make_celery(settings)
    app.conf.worker_consumer = f"{__name__}:BatchedEventsConsumer"
    return app


def install_patches() -> None:
    """Patch kombu's Redis transport in this process (idempotent: each patch marks
    what it replaced and is applied once)."""
    _tolerate_restore_after_connection_loss()
    _tolerate_ack_on_a_closed_channel()
    _reuse_the_channel_client()
    _take_every_waiting_message()


# --- kombu's Redis transport -----------------------------------------------------------


def _tolerate_restore_after_connection_loss() -> None:
    """Turn a worker that would hang after a Redis restart into one that reconnects.

    When the broker connection drops, kombu closes the channel and tries to restore
    its unacked messages at once, through the connection that is already gone; the
    ``AttributeError`` that raises is not a connection error, so the consumer's error
    handler dies with it and the worker hangs without ever reconnecting. Nothing needs
    restoring there: unacked messages return through the visibility-timeout sweep. So
    that one call may fail quietly. (Celery 5.7 / kombu 5.7 can still stop the worker
    after reconnecting, with another ``AttributeError``; a stopped worker is restarted
    by its supervisor: ``ofa-entail up``, compose's restart policy, systemd;
    ``_tolerate_ack_on_a_closed_channel`` removes the cause we have seen.)
    """
    if getattr(VirtualQoS.restore_unacked_once, "_ofa_tolerant", False):
        return
    original = VirtualQoS.restore_unacked_once

    def restore_unacked_once(self: VirtualQoS, stderr: object = None) -> object:
        try:
            return original(self, stderr)
        except AttributeError as exc:
            logger.warning("unacked messages left for the visibility sweep (%s)", exc)
            return None

    restore_unacked_once._ofa_tolerant = True  # type: ignore[attr-defined]
    VirtualQoS.restore_unacked_once = restore_unacked_once  # type: ignore[method-assign]


def _tolerate_ack_on_a_closed_channel() -> None:
    """Keep the worker alive when a task finishes after a broker restart.

    A task that was running when the connection dropped acknowledges its message on
    the old channel, whose connection kombu has already dropped: the ``AttributeError``
    that raises is not a connection error, so it escapes into the consumer and stops
    the worker ("Unrecoverable error"). That acknowledgement cannot be made anyway
    (the channel is gone); the message stays in the unacked index, comes back after
    the visibility timeout, and its handler finds the job finished and does nothing.
    """
    if getattr(RedisQoS.ack, "_ofa_tolerant", False):
        return
    original_ack, original_reject = RedisQoS.ack, RedisQoS.reject

    def closed(qos: RedisQoS) -> bool:
        return getattr(qos.channel, "connection", None) is None

    def ack(self: RedisQoS, delivery_tag: object) -> None:
        try:
            original_ack(self, delivery_tag)
        except AttributeError:
            if not closed(self):
                raise
            logger.warning("message %s not acknowledged: its channel closed", delivery_tag)

    def reject(self: RedisQoS, delivery_tag: object, requeue: bool = False) -> None:
        try:
            original_reject(self, delivery_tag, requeue=requeue)
        except AttributeError:
            if not closed(self):
                raise
            logger.warning("message %s not rejected: its channel closed", delivery_tag)

    ack._ofa_tolerant = True  # type: ignore[attr-defined]
    RedisQoS.ack = ack  # type: ignore[method-assign]
    RedisQoS.reject = reject  # type: ignore[method-assign]


def _reuse_the_channel_client() -> None:
    """One redis-py client per kombu channel instead of one per command.

    kombu builds a new ``redis.Redis`` around the channel's connection pool for every
    publish, acknowledgement and unacked-index write; each one copies redis-py's table
    of ~250 response callbacks, which profiled at about 8% of a worker's CPU at a few
    hundred jobs/s. A client holds no per-command state (each command borrows a
    connection from the thread-safe pool), so the channel keeps one, rebuilt whenever
    the channel's pool is (after a reconnection).
    """
    if getattr(Channel._create_client, "_ofa_reused", False):
        return
    original = Channel._create_client

    def _create_client(self: Channel, asynchronous: bool = False) -> object:
        if asynchronous:
            return original(self, asynchronous)
        pool = self.pool
        client = self.__dict__.get("_ofa_client")
        if client is None or client.connection_pool is not pool:
            client = self.__dict__["_ofa_client"] = original(self, False)
        return client

    _create_client._ofa_reused = True  # type: ignore[attr-defined]
    Channel._create_client = _create_client  # type: ignore[method-assign]


# At most this many messages more per event-loop turn, beside the one BRPOP gave.
TAKE_AT_ONCE = 32


def _take_every_waiting_message() -> None:
    """Take the messages waiting on a queue together, not one per event-loop turn, and
    enter them in the unacked index together.

    kombu's Redis channel pops one message per BRPOP, writes its unacked entry (a
    MULTI of its own) and hands it over, then issues the next BRPOP: a worker's intake
    is one message per turn of its event loop, and under load messages wait in the
    list (31 ms at p50 from a job's creation to its start, measured) while the
    worker's interpreter lock is free ~60% of the time. Here, once BRPOP has given a
    message, one ``RPOP key count`` takes up to the channel's free prefetch more from
    the same list (Redis >= 6.2), and when that took any, one MULTI enters all of them
    in the unacked index before any is handed over; kombu's ``QoS.append`` then skips
    its own write for those (``_enter_unacked``). An entry whose message was
    not handed to a consumer that acknowledges (a delivery raised, or the consumer
    takes messages without acknowledgement) is removed again, and messages taken but
    not delivered go back onto the list, oldest last, as they were. Interactive
    messages then arrive in groups (``worker/groups.py``), which share their round
    trips (measured with ``bench_plumbing``). The body restates kombu 5.7's
    ``Channel._brpop_read``, whose only changes are the RPOP and the one write: a
    ``count`` there belongs upstream.
    """
    if getattr(Channel._brpop_read, "_ofa_takes_all", False):
        return
    _skip_entered_appends()

    def _brpop_read(self: Channel, **options: Any) -> bool:
        try:
            try:
                got = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not got:
                raise Empty()
            key, item = got
            dest = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            items = [item]
            room = self.qos.can_consume_max_estimate()
            more = TAKE_AT_ONCE if room is None else min(TAKE_AT_ONCE, room - 1)
            if more > 0:
                self.client.connection.send_command("RPOP", key, more)
                items += self.client.parse_response(self.client.connection, "RPOP") or []
            payloads = [json_loads(bytes_to_str(raw)) for raw in items]
            if len(payloads) > 1:
                _enter_unacked(self.qos, payloads)
            try:
                for n, payload in enumerate(payloads):
                    try:
                        self.connection._deliver(payload, dest)
                    except BaseException:
                        if rest := items[n + 1 :]:
                            self.client.rpush(key, *reversed(rest))
                        raise
            finally:
                _forget_entered(self.qos)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    _brpop_read._ofa_takes_all = True  # type: ignore[attr-defined]
    Channel._brpop_read = _brpop_read  # type: ignore[method-assign]


# kombu QoS attribute: tags entered in the unacked index ahead of their delivery.
_ENTERED = "_ofa_entered"


def _enter_unacked(qos: Any, payloads: list[dict[str, Any]]) -> None:
    """Enter several messages in kombu's unacked index in one MULTI, before they are
    delivered, with the entries its ``QoS.append`` writes one MULTI each (the tag scored
    by the time; the raw message, its exchange and routing key). ``append`` then only
    does its in-memory bookkeeping for those (``_skip_entered_appends``)."""
    now = time.time()
    entries: dict[str, str] = {}
    for payload in payloads:
        props = payload.get("properties") or {}
        tag, delivery = props.get("delivery_tag"), props.get("delivery_info")
        if tag is not None and delivery is not None:  # else kombu's own append
            entries[tag] = json_dumps([payload, delivery["exchange"], delivery["routing_key"]])
    if not entries:
        return
    with qos.pipe_or_acquire() as pipe:
        pipe.zadd(qos.unacked_index_key, dict.fromkeys(entries, now))
        pipe.hset(qos.unacked_key, mapping=entries)
        pipe.execute()
    qos.__dict__[_ENTERED] = set(entries)


def _forget_entered(qos: Any) -> None:
    """Remove the entries ``_enter_unacked`` wrote for messages that were not appended
    (never delivered, or delivered to a consumer without acknowledgement)."""
    left = qos.__dict__.pop(_ENTERED, None)
    if left:
        with qos.pipe_or_acquire() as pipe:
            for tag in left:
                qos._remove_from_indices(tag, pipe)
            pipe.execute()


def _skip_entered_appends() -> None:
    """kombu's Redis ``QoS.append`` writes no entry for a message ``_enter_unacked``
    already entered: it only does the in-memory bookkeeping (the virtual QoS's)."""
    if getattr(RedisQoS.append, "_ofa_together", False):
        return
    original_append = RedisQoS.append

    def append(self: RedisQoS, message: Any, delivery_tag: str) -> None:
        entered = self.__dict__.get(_ENTERED)
        if entered and delivery_tag in entered:
            entered.discard(delivery_tag)
            VirtualQoS.append(self, message, delivery_tag)
        else:
            original_append(self, message, delivery_tag)

    append._ofa_together = True  # type: ignore[attr-defined]
    RedisQoS.append = append  # type: ignore[method-assign]


# --- acknowledgements ------------------------------------------------------------------


def ack_together(messages: list[Message]) -> None:
    """Acknowledge a group's messages in one round trip. For each message kombu's Redis
    transport runs a transaction of its own (ZREM from the unacked index, HDEL from the
    unacked hash: 8% of a worker's CPU under load); here both commands take every tag of
    a channel at once, then kombu's own bookkeeping runs per message as in
    ``Message.ack``. Anything else (another transport, a channel already closed: see
    ``_tolerate_ack_on_a_closed_channel``) takes kombu's path, one message at a time."""
    by_channel: dict[int, list[Message]] = {}
    for message in messages:
        by_channel.setdefault(id(message.channel), []).append(message)
    for group in by_channel.values():
        channel = group[0].channel
        qos = getattr(channel, "qos", None)
        if not isinstance(qos, RedisQoS) or getattr(channel, "connection", None) is None:
            for message in group:
                message.ack()
            continue
        tags = [message.delivery_tag for message in group]
        try:
            with qos.pipe_or_acquire() as pipe:
                pipe.zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()
        except (redis.RedisError, AttributeError, OSError) as exc:
            # The broker went away: the messages come back after the visibility
            # timeout, and find their jobs finished.
            logger.warning("%d messages not acknowledged: %s", len(tags), exc)
            continue
        for message in group:
            VirtualQoS.ack(qos, message.delivery_tag)  # what RedisQoS.ack does after
            message._state = "ACK"  # what Message.ack does after


# --- Celery's consumer -----------------------------------------------------------------

EVENT_FLUSH_S = 0.05
# A timer armed longer ago than this is presumed lost (the loop was rebuilt after a
# reconnection) and is armed again.
LOST_AFTER_S = 1.0


class BatchedEventsConsumer(CeleryConsumer):
    """Celery's own consumer (``worker_consumer``), with task events sent in batches on
    a short timer.

    With an event loop Celery buffers task events (received, started, succeeded) and
    flushes the buffer on the loop's next turn, which at a few hundred jobs/s means a
    PUBLISH of one or two events per turn: about a tenth of a worker's CPU in the
    profile. Here the first buffered event arms a timer and everything buffered in the
    next ``EVENT_FLUSH_S`` goes out as one ``task.multi`` message, which Flower reads
    like any other (Celery also flushes on its own whenever ``buffer_limit`` events
    wait). Monitoring lags by at most that interval; job records are never delayed by
    it."""

    _flush_armed_at = 0.0

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        if now - self._flush_armed_at < LOST_AFTER_S:
            return  # a flush is already due
        self._flush_armed_at = now
        # Timers belong to the loop's thread; events also come from task threads.
        self.hub.call_soon(self._arm_event_flush)

    def _arm_event_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_armed_at = 0.0
        self._flush_events()
