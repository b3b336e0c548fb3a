"""The owners of every record the service keeps in Redis (one module each).

``jobs.py`` (``JobStore``) changes a job's state: its record, in-flight mark, the
verdict cache, and its image in the payload store (``shared/payloads.py``);
``job_reads.py`` (``JobReads``) reads them and holds the done channel's one
subscriber (``DoneChannel``); ``reaping.py`` (``JobReaping``) is the
reaper's look at them. ``scans.py`` owns a scan's record and its coordinator lock,
``workers.py`` the workers' heartbeats and the webhook and reaper counters,
``webhooks.py`` the per-receiver delivery slots, ``apikeys.py`` and ``limits.py`` the
API keys and their rate limits. Each knows its keys (through ``Keys``), how its fields
are encoded, its lifetimes and every state change; nothing else reads or writes those
keys. Every store is built as ``Store(settings, keys, clients)``, by
``shared/wiring.py:stores`` alone; the scripts are ``lua/*.lua`` (``scripts.py``).
Blocking methods serve the workers, the coordinator and the API's thread pool; the
``a``-prefixed ones serve the API's event loop.

Who writes what, in order (see docs/ARCHITECTURE.md):
job: ``create_or_join`` (API or coordinator) -> ``start`` -> ``succeed`` | ``fail`` (worker);
scan: ``create`` (API) -> ``start`` -> ``publish_counts``* -> ``finish`` (coordinator),
or ``acancel`` (API) at any point before the end.
"""

from shared.store.clients import AsyncRedis, Clients, MissingClientError, Store, SyncRedis
from shared.store.codec import bytes_of, decode_hash, now, text_of
from shared.store.job_reads import Collected, DoneChannel, JobReads, Read
from shared.store.jobs import (
    SCAN_JOB_LINGER_S,
    Created,
    Hook,
    JobStore,
    StartAction,
    Started,
)
from shared.store.reaping import JobReaping
from shared.store.scans import ScanStore, summarize
from shared.store.webhooks import WebhookSlots, receiver_of
from shared.store.workers import ReaperLog, WebhookLog, WorkerRegistry

__all__ = [
    "SCAN_JOB_LINGER_S",
    "AsyncRedis",
    "Clients",
    "Collected",
    "Created",
    "DoneChannel",
    "Hook",
    "JobReads",
    "JobReaping",
    "JobStore",
    "MissingClientError",
    "Read",
    "ReaperLog",
    "ScanStore",
    "StartAction",
    "Started",
    "Store",
    "SyncRedis",
    "WebhookLog",
    "WebhookSlots",
    "WorkerRegistry",
    "bytes_of",
    "decode_hash",
    "now",
    "receiver_of",
    "summarize",
    "text_of",
]
