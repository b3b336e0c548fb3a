"""Celery's task events, sent by the worker's own consumers (``worker/bulk.py``,
``worker/groups.py``) as Celery's pool would send them, so Flower lists their tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def task_event(consumer: Any, kind: str, task_id: str, **fields: Any) -> None:
    """Send ``kind`` (task-started, task-succeeded, ...) for ``task_id``, if events are
    enabled (they are buffered and flushed together: shared/celery_consumer.py)."""
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
