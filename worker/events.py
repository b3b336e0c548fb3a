"""Celery's task events, sent by the worker's own consumers (``worker/bulk.py``,
``worker/groups.py``) as Celery's pool would send them, so Flower lists their tasks."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

from worker.broker import Message


def task_event(consumer: Any, kind: str, task_id: str, **fields: Any) -> None:
    """Send ``kind`` (task-started, task-succeeded, ...) for ``task_id``, if events are
    enabled (they are buffered and flushed together: worker/broker.py)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.send(kind, uuid=task_id, **fields)


def received_event(consumer: Any, headers: Mapping[str, Any]) -> None:
    """task-received for a message, from its protocol-2 headers."""
    task_event(
        consumer,
        "task-received",
        str(headers.get("id", "")),
        name=headers.get("task"),
        args=headers.get("argsrepr", ""),
        kwargs=headers.get("kwargsrepr", ""),
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        retries=headers.get("retries", 0),
        eta=None,
        expires=None,
    )


def handed_back(consumer: Any, message: Message, task_id: str, requeue: bool = True) -> None:
    """Reject ``message`` (back on its queue when ``requeue``: another model's work)
    and say so, as Celery does for a task raising ``Reject``."""
    message.reject(requeue=requeue)
    task_event(consumer, "task-rejected", task_id, requeue=requeue)


def dropped(consumer: Any, message: Message, task_id: str, exc: BaseException) -> None:
    """Acknowledge a message no worker can ever run (not retried) and report the task
    failed with ``exc``; call it from the ``except`` block, for the traceback."""
    message.ack()
    task_event(
        consumer, "task-failed", task_id, exception=repr(exc), traceback=traceback.format_exc()
    )
