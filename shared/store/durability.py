"""Durable acknowledgement (``OFA_DURABLE_ACK``): a write is on disk before the caller
is told it is stored. ``WAITAOF`` follows the writes on the same connection (never
inside a transaction); its reply is checked by ``confirm_on_disk``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.errors import QueueUnavailableError
from shared.settings import Settings
from shared.store.scripts import Batch


def wait_on_disk(batch: Batch, settings: Settings) -> bool:
    """Queue ``WAITAOF`` on ``batch`` when durable acknowledgement is on (its reply
    comes last): the primary's AOF, and with ``OFA_DURABLE_ACK=replica`` one replica's
    too. True when queued."""
    if not settings.durable_ack_on:
        return False
    batch.command("WAITAOF", 1, settings.durable_ack_replicas, settings.durable_ack_timeout_ms)
    return True


def confirm_on_disk(reply: Any, undo: Callable[[], None], what: str, replicas: int = 0) -> None:
    """Check a WAITAOF reply: the write is fsynced on the durable store (and on
    ``replicas`` of its replicas), or it is undone and ``QueueUnavailableError`` says
    why."""
    if isinstance(reply, Exception):
        undo()
        raise QueueUnavailableError(
            f"durable acknowledgement (OFA_DURABLE_ACK) failed: {reply}. The durable "
            "store needs appendonly yes, or set OFA_DURABLE_ACK=off"
        )
    if int(reply[0]) < 1:
        undo()
        raise QueueUnavailableError(f"the durable store did not confirm the {what} on disk in time")
    if int(reply[1]) < replicas:
        # The primary has it, but no replica confirmed it: a failover now could lose it,
        # so it is not acknowledged (OFA_DURABLE_ACK=replica).
        undo()
        raise QueueUnavailableError(
            f"no replica of the durable store confirmed the {what} on disk in time"
        )
