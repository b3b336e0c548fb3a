"""The owners of every record the service keeps in Redis (one module each).

``JobStore`` owns a job's record, its image blob, its in-flight mark and the verdict
cache; ``ScanStore`` owns a scan's record and its coordinator lock; ``WorkerRegistry``
owns the workers' heartbeats. Each knows its keys (through ``Keys``), how its fields
are encoded, its lifetimes and every state change; nothing else reads or writes those
keys. Blocking methods serve the workers, the coordinator and the API's thread pool;
the ``a``-prefixed ones serve the API's event loop.

Who writes what, in order (see docs/ARCHITECTURE.md):
job: ``create_or_join`` (API or coordinator) -> ``start`` -> ``succeed`` | ``fail`` (worker);
scan: ``create`` (API) -> ``start`` -> ``publish_counts``* -> ``finish`` (coordinator),
or ``acancel`` (API) at any point before the end.
"""

from shared.store.codec import bytes_of, decode_hash, now, text_of
from shared.store.jobs import (
    SCAN_JOB_LINGER_S,
    Created,
    Hook,
    JobStore,
    Outcome,
    Read,
    StartAction,
    Started,
)
from shared.store.scans import ScanStore, summarize
from shared.store.webhooks import WebhookSlots, receiver_of
from shared.store.workers import ReaperLog, WorkerRegistry

__all__ = [
    "SCAN_JOB_LINGER_S",
    "Created",
    "Hook",
    "JobStore",
    "Outcome",
    "Read",
    "ReaperLog",
    "ScanStore",
    "StartAction",
    "Started",
    "WebhookSlots",
    "WorkerRegistry",
    "bytes_of",
    "decode_hash",
    "now",
    "receiver_of",
    "summarize",
    "text_of",
]
