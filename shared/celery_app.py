"""The Celery application both sides share: settings, task names, queue names.

Importable without torch: the API sends tasks by name and never imports worker code.
Job status comes from our own job records, never from Celery results (Celery calls
an unknown id PENDING).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from shared.settings import Settings, get_settings
from shared.wiring import celery_broker, redis_urls

TASK_ENTAIL = "ofa.entail"
TASK_ENTAIL_CHUNK = "ofa.entail.chunk"
TASK_SCAN = "ofa.scan.run"
TASK_CALLBACK = "ofa.scan.callback"
TASK_JOB_CALLBACK = "ofa.job.callback"
SCAN_QUEUE = "ofa.scans"  # the coordinator's queue: no GPU needed
# Webhook deliveries: the coordinator takes them on a consumer with threads of its own
# (worker/scans/webhooks.py), never the threads that run scan slices.
WEBHOOK_QUEUE = "ofa.webhooks"


def queue_name(model_id: str, revision: str, bulk: bool = False) -> str:
    """Each model has its own queues, so a task waits for a worker serving its model.

    Interactive jobs and bulk scans use separate queues; a worker's Celery consumer
    takes the interactive one (its messages run in groups, ``worker/groups.py``), and
    a consumer of its own the bulk one (``worker/bulk.py``), so scan work never holds
    the interactive prefetch slots.
    """
    kind = "bulk" if bulk else "interactive"
    return f"ofa.{kind}.{model_id}@{revision}"


logger = logging.getLogger(__name__)


def _tolerate_restore_after_connection_loss() -> None:
    """Turn a worker that would hang after a Redis restart into one that reconnects.

    When the broker connection drops, kombu closes the channel and tries to restore
    its unacked messages at once, through the connection that is already gone; the
    ``AttributeError`` that raises is not a connection error, so the consumer's error
    handler dies with it and the worker hangs without ever reconnecting. Nothing needs
    restoring there: unacked messages return through the visibility-timeout sweep. So
    that one call may fail quietly. (Celery 5.7 / kombu 5.7 can still stop the worker
    after reconnecting, with another ``AttributeError``; a stopped worker is restarted
    by its supervisor: ``ofa-entail up``, compose's restart policy, systemd; the next
    function removes the cause we have seen.)
    """
    from kombu.transport.virtual.base import QoS

    if getattr(QoS.restore_unacked_once, "_ofa_tolerant", False):
        return
    original = QoS.restore_unacked_once

    def restore_unacked_once(self: QoS, stderr: object = None) -> object:
        try:
            return original(self, stderr)
        except AttributeError as exc:
            logger.warning("unacked messages left for the visibility sweep (%s)", exc)
            return None

    restore_unacked_once._ofa_tolerant = True  # type: ignore[attr-defined]
    QoS.restore_unacked_once = restore_unacked_once  # type: ignore[method-assign]


def _tolerate_ack_on_a_closed_channel() -> None:
    """Keep the worker alive when a task finishes after a broker restart.

    A task that was running when the connection dropped acknowledges its message on
    the old channel, whose connection kombu has already dropped: the ``AttributeError``
    that raises is not a connection error, so it escapes into the consumer and stops
    the worker ("Unrecoverable error"). That acknowledgement cannot be made anyway
    (the channel is gone); the message stays in the unacked index, comes back after
    the visibility timeout, and its handler finds the job finished and does nothing.
    """
    from kombu.transport.redis import QoS as RedisQoS

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
    from kombu.transport.redis import Channel

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
    trips (measured with ``bench_plumbing``: ``bench/results/HISTORY.md``,
    items 21 and 22). The body restates kombu 5.7's ``Channel._brpop_read``, whose
    only changes are the RPOP and the one write: a ``count`` there belongs upstream.
    """
    from queue import Empty

    from kombu.transport.redis import Channel
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import loads

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
            payloads = [loads(bytes_to_str(raw)) for raw in items]
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
    import time

    from kombu.utils.json import dumps

    now = time.time()
    entries: dict[str, str] = {}
    for payload in payloads:
        props = payload.get("properties") or {}
        tag, delivery = props.get("delivery_tag"), props.get("delivery_info")
        if tag is not None and delivery is not None:  # else kombu's own append
            entries[tag] = dumps([payload, delivery["exchange"], delivery["routing_key"]])
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
    from kombu.transport.redis import QoS
    from kombu.transport.virtual.base import QoS as VirtualQoS

    if getattr(QoS.append, "_ofa_together", False):
        return
    original_append = QoS.append

    def append(self: QoS, message: Any, delivery_tag: str) -> None:
        entered = self.__dict__.get(_ENTERED)
        if entered and delivery_tag in entered:
            entered.discard(delivery_tag)
            VirtualQoS.append(self, message, delivery_tag)
        else:
            original_append(self, message, delivery_tag)

    append._ofa_together = True  # type: ignore[attr-defined]
    QoS.append = append  # type: ignore[method-assign]


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app (broker and result backend: the durable Redis)."""
    _tolerate_restore_after_connection_loss()
    _tolerate_ack_on_a_closed_channel()
    _reuse_the_channel_client()
    _take_every_waiting_message()
    # A Sentinel URL becomes kombu's form: the Sentinels, the master name and their own
    # arguments in the transport options (the broker and the result backend alike).
    durable, sentinel_options = celery_broker(redis_urls(settings)[0])
    transport = {
        **sentinel_options,
        # A message a dead worker took comes back after this long: above the hard time
        # limit, so a task still running healthily is never handed to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
    }
    broker_transport = {
        **transport,
        # Sweep for abandoned messages every interval (kombu's default scans only every
        # tenth sweep, about 100 s), so recovery takes about visibility timeout + interval.
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        # Poll queues in the order a worker lists them (interactive before bulk).
        "queue_order_strategy": "priority",
    }
    app = Celery("ofa_entail", broker=durable, backend=durable)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=broker_transport,
        result_backend_transport_options=dict(transport),
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # Time limits: enforced by Celery in prefork pools; with the threads pool the
        # worker enforces the soft limit itself on its wait for the batch.
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_ignore_result=True,  # job records carry the outcome
        result_expires=settings.job_ttl_s,
        worker_send_task_events=True,  # Flower: received, started, succeeded (and result)
        # ... sent in batches every 50 ms (worker/celery_consumer.py), read the same way.
        worker_consumer="worker.celery_consumer:Consumer",
        # No "sent" event from the API: a fan-out PUBLISH per submission cost about a
        # third of send_task (bench/results/plumbing-cpu.md); Flower lists a
        # task from the moment a worker receives it, and the job record has its creation.
        task_send_sent_event=False,
        task_default_queue=queue_name(*settings.model_tag),
        worker_hijack_root_logger=False,
        broker_pool_limit=64,
    )
    return app


# For `celery --app shared.celery_app:app flower` (Flower needs only the broker).
def __getattr__(name: str) -> Celery:
    if name == "app":
        return make_celery(get_settings())
    raise AttributeError(name)
