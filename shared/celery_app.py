"""The Celery application every process shares: its settings, nothing else.

Importable without torch: the API sends tasks by name (``shared/wire.py``) and never
imports worker code. Job status comes from our own job records, never from Celery
results (Celery calls an unknown id PENDING). The plain app: the worker and the
coordinator bend kombu and Celery in ``worker/broker.py``, the API and Flower never.
"""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings, get_settings
from shared.wire import queue_name
from shared.wiring import celery_broker, redis_urls


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app (broker and result backend: the durable Redis), as the
    API and Flower use it; ``worker/broker.py:worker_celery`` makes the workers' own."""
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
        # Flower: received, started, succeeded (and result); the workers' consumer sends
        # them in batches every 50 ms (worker/broker.py), Flower reads them the same way.
        worker_send_task_events=True,
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
