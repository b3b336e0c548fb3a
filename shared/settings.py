"""One settings object, read from the environment (prefix ``OFA_``) and an ``.env`` file.

Every external service has one URL. With no Redis URL configured the service starts
an embedded Valkey server in ``data_dir`` (see ``shared/embedded.py``), so a laptop
needs no set-up. Secrets (API keys, Flower password, webhook secret) have no default
in the code: when none is configured, ``ofa-entail up`` generates them once into
``data_dir`` and prints where they are.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

DEFAULT_MODEL = "iic/ofa_visual-entailment_snli-ve_large_en"
DEFAULT_REVISION = "master"


# Old environment names still read, each with the name that replaced it.
DEPRECATED_NAMES = {"OFA_WORKER_THREADS": "OFA_INTERACTIVE_PREFETCH"}
_warned: set[str] = set()


def _warn_deprecated_names() -> None:
    """Log, once per process, each deprecated name found in the environment."""
    for old, new in DEPRECATED_NAMES.items():
        if old in os.environ and old not in _warned:
            _warned.add(old)
            log.warning("%s is deprecated: set %s instead (same meaning)", old, new)


PAYLOAD_SCHEMES = ("s3", "gs", "az", "redis", "rediss", "unix", "sentinel")


def split_urls(value: str) -> list[str]:
    """Comma-separated URLs, split only before a scheme: a Sentinel URL's own commas
    (``sentinel://h1:26379,h2:26379/mymaster``) stay inside it."""
    return [u.strip() for u in re.split(r",(?=\s*[a-z][a-z0-9+.-]*://)", value) if u.strip()]


class Settings(BaseSettings):
    """Configuration of the API, the workers and the command line."""

    model_config = SettingsConfigDict(
        env_prefix="OFA_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".data")

    # Redis: durable (broker, jobs, blobs: must not evict) and cache (verdicts).
    redis_url: str | None = None
    cache_redis_url: str | None = None
    key_prefix: str = "ofa:v1:"

    # Model.
    model: str = DEFAULT_MODEL
    model_revision: str = DEFAULT_REVISION
    model_dir: Path | None = None  # a local checkpoint; wins over model/model_revision
    model_cache_dir: Path | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    # Worker batching.
    batch_size: int = Field(16, ge=1, le=512)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    # While interactive jobs are about, a batch of scan work is cut to what the model
    # finishes in about this long (the most an interactive job waits behind it); 0: off.
    bulk_batch_ms: float = Field(20.0, ge=0, le=60_000)
    # Interactive messages a worker process holds at a time (Celery's concurrency, so
    # its prefetch); a few threads of the worker's own run them in groups. 0: four
    # batches' worth (``interactive_prefetch``). ``OFA_WORKER_THREADS`` is its old,
    # deprecated name (it never set threads): still read, with a warning in the log.
    interactive_prefetch_setting: int = Field(
        0,
        ge=0,
        le=2048,
        validation_alias=AliasChoices("OFA_INTERACTIVE_PREFETCH", "OFA_WORKER_THREADS"),
    )
    # Bulk-queue messages (scan chunks) a worker process runs at a time, on threads of
    # their own: never the interactive messages' prefetch slots above. It holds twice
    # as many (``worker/bulk.py``): the next chunk is there when a thread finishes one.
    bulk_chunks: int = Field(4, ge=1, le=256)
    # Processes that decode and resize images beside a worker (outside its interpreter
    # lock); 0: in the worker's own threads.
    preprocess_processes: int = Field(0, ge=0, le=256)

    # Limits on input.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_text_chars: int = Field(1000, ge=1)
    url_timeout_s: float = Field(5.0, gt=0)
    url_max_redirects: int = Field(3, ge=0)
    url_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_wait_s: float = Field(30.0, ge=0)
    # The one OpenTelemetry switch: FastAPI's own instrumentation and one trace per job
    # (API -> message -> worker's batch -> webhook, shared/tracing.py), exported by the
    # SDK provider installed, else over OTLP/HTTP (the `tracing` extra). Off: nothing is
    # traced, the hooks cost a check of a module global (so the default), the service's
    # Prometheus metrics stand, and each request skips FastAPI's provider check.
    opentelemetry: bool = False
    # Load shedding: past this many unfinished jobs, new interactive submissions that
    # are not cache hits get 503 + Retry-After (cache hits and polls still work). 0: off.
    max_pending_jobs: int = Field(10_000, ge=0)
    # ... and past this many bytes of images held for unfinished interactive jobs (the
    # durable store holds them until a worker is done). Scans' jobs count toward
    # neither: their own caps bound them (scan_window, the per-key and global scan
    # caps below), so bulk work never sheds another key's interactive work. 0: off.
    max_pending_image_bytes: int = Field(2 * 1024**3, ge=0)
    # Tenancy. The verdict cache is shared by every key by default (a verdict computed
    # for one key serves all: its existence is visible to others, never its inputs);
    # "key" mixes the API key's id into every verdict key, so each key has a cache
    # (and joins) of its own.
    cache_scope: Literal["shared", "key"] = "shared"
    # Scans per API key: unfinished at once, and manifest bytes stored for its scans
    # that still exist (until OFA_SCAN_TTL_S); past either the key gets 429. Past
    # max_active_scans unfinished scans in all, any key gets 503. 0: off.
    max_scans_per_key: int = Field(4, ge=0)
    max_scan_bytes_per_key: int = Field(8 * 1024**3, ge=0)
    max_active_scans: int = Field(64, ge=0)

    # Lifetimes (seconds).
    verdict_ttl_s: int = Field(30 * 24 * 3600, ge=1)
    job_ttl_s: int = Field(24 * 3600, ge=1)
    blob_ttl_s: int = Field(24 * 3600, ge=1)

    # Celery: a message a dead worker held comes back after visibility_timeout_s, which
    # must stay above the hard time limit so a healthy task is never delivered twice.
    task_soft_time_limit_s: int = Field(60, ge=1)
    task_time_limit_s: int = Field(90, ge=1)
    visibility_timeout_s: int = Field(120, ge=1)
    # How often workers sweep for messages whose holder died (kombu's default is ~100 s).
    unacked_restore_interval_s: int = Field(10, ge=1)

    # Leases and the reaper (the job record, not the broker, is the source of truth).
    # A queued job not started within dispatch_deadline_s is sent again; a running job
    # holds a lease its worker renews every lease_s / 3; every reaper_interval_s one
    # reaper (in some worker or coordinator) re-sends what is overdue.
    dispatch_deadline_s: float = Field(300.0, gt=0)
    lease_s: float = Field(30.0, gt=0)
    reaper_interval_s: float = Field(5.0, gt=0)
    # A queued job whose message is on no queue and in no worker's hands (a worker died
    # between taking it and recording it) is sent again once it was sent this long ago
    # (its message has had time to arrive), not at its dispatch deadline.
    lost_message_grace_s: float = Field(5.0, ge=0)
    max_attempts: int = Field(3, ge=1)  # starts (worker died, or a transient error) before failing
    max_dispatches: int = Field(10, ge=1)  # sends of a job no worker ever started
    retry_backoff_s: float = Field(2.0, ge=0)  # first wait after a transient error (doubles)
    scan_max_slice_failures: int = Field(5, ge=1)
    # "fsync": POST answers 202 only once WAITAOF confirms the job record is on disk.
    # "replica": ... on the primary's disk and on at least one replica's (WAITAOF 1 1),
    # so an acknowledged job survives losing the primary's host to a Sentinel failover.
    durable_ack: Literal["off", "fsync", "replica"] | None = None  # default: fsync in production
    durable_ack_timeout_ms: int = Field(2000, ge=1)

    # Catalogue scans. Manifests and per-scan result files live under scan_dir, which
    # the API and the scan coordinator must share (one host, or a shared volume).
    scan_dir: Path | None = None  # default: data_dir / "scans"
    manifest_root: Path | None = None  # server-side manifests allowed under here
    image_root: Path | None = None  # manifest rows may name image files under here
    # True when every worker reads image_root at the same path (a shared volume): a scan
    # row's file is then handed to its job by reference, never copied to the payload store.
    image_root_shared: bool = False
    scan_window: int = Field(256, ge=1, le=100_000)  # distinct misses in flight per scan
    scan_fetch_concurrency: int = Field(16, ge=1, le=512)
    scan_chunk_rows: int = Field(500, ge=1, le=100_000)
    # Image bytes a coordinator holds for one chunk at most (rows' images waiting for
    # their lookup or their job, plus OFA_MAX_UPLOAD_BYTES reserved per fetch in
    # flight): past it, the chunk's misses so far are submitted before more is fetched
    # or read. Without it a chunk could hold OFA_SCAN_CHUNK_ROWS full-size images (5
    # GiB by default). Below the upload limit it still takes one image at a time.
    scan_chunk_image_bytes: int = Field(128 * 1024**2, ge=1)
    # A scan's misses travel to the workers this many to a Celery message (each still
    # its own job). Keep one chunk's scoring time well under the visibility timeout.
    bulk_chunk_jobs: int = Field(32, ge=1, le=1000)
    scan_slice_s: float = Field(10.0, gt=0)  # a coordinator task's slice before it re-queues
    scan_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    max_manifest_bytes: int = Field(2 * 1024**3, ge=1024)
    # The longest manifest line (a JSONL row, a CSV record) in bytes; 0: a base64 image
    # at the upload limit plus 64 KiB (``manifest_line_bytes``). Lines are read in
    # bounded pieces, never held whole: a longer first line refuses the manifest, a
    # longer later one becomes that row's error.
    max_manifest_line_bytes: int = Field(0, ge=0)
    url_meta_ttl_s: int = Field(90 * 24 * 3600, ge=60)
    webhook_secret: SecretStr | None = None
    callback_max_retries: int = Field(8, ge=0)
    # Webhooks (job and scan callbacks) run on the coordinator's threads of their own
    # (worker/scans/webhooks.py), so a slow receiver can hold a thread only so long:
    # one delivery (connect, send, the whole answer) ends within webhook_timeout_s
    # (capped at half the visibility timeout, ``webhook_deadline_s``: its message must
    # not come back while it still runs), reading at most webhook_max_answer_bytes of
    # the answer; at most webhook_per_host deliveries to one receiver (host:port) at a
    # time across every coordinator (a receiver at its bound waits in the queue, not on
    # a thread); webhook_threads deliveries at a time per coordinator.
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)
    webhook_max_answer_bytes: int = Field(64 * 1024, ge=0, le=16 * 1024 * 1024)
    webhook_per_host: int = Field(4, ge=1, le=1000)
    webhook_threads: int = Field(16, ge=1, le=256)

    # Object storage (shared/objects.py): S3, GCS, Azure, or an S3-compatible server at
    # s3_endpoint_url (empty: AWS). Credentials come from each cloud's standard chain
    # (environment, web-identity token file, instance or workload identity), never from
    # a request. object_buckets is the global allow-list of what a request may name:
    # ``s3://bucket``, ``gs://bucket``, ``az://container``, or ``s3://bucket/prefix/``
    # for keys under a prefix, comma-separated; empty: no object URLs at all. A key's
    # own list, where it has one, narrows it. s3_allow_http: plain-HTTP endpoints (a
    # local test server). object_timeout_s: a connect, or a stalled read, fails after
    # this (a failed request is retried only within it).
    s3_endpoint_url: str = ""
    s3_region: str = ""  # empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    s3_allow_http: bool = False
    object_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    object_timeout_s: float = Field(10.0, gt=0, le=300)
    # Where images of unfinished jobs wait for a worker (shared/payloads.py), one per
    # job: "local" (a folder, payload_dir or data_dir/payloads; a shared volume when
    # pointed at one: the API, coordinators and workers must all reach it), an
    # object-store prefix ("s3://bucket/prefix", gs://, az://), Redis nodes chosen by
    # the name's hash ("redis": payload_redis_urls; or the URLs themselves,
    # comma-separated), or "durable" (the durable Redis itself, expiring after
    # blob_ttl_s). Written before the job record, removed when the job ends, swept by
    # the reaper when orphaned.
    payload_store: str = "local"
    payload_dir: Path | None = None
    payload_redis_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Auth. Keys are compared in constant time; comma-separated in the environment.
    # These have every scope and the default limits; key records (``ofa-entail keys``)
    # carry their own scopes and limits.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    key_cache_s: float = Field(5.0, ge=0)  # a revoked key stops working within this
    # Per-key rate limits (GCRA in the durable store, shared by every API process):
    # submissions that compute, per minute, and the burst; cache hits get
    # cache_hit_rate_factor times both. 0: unlimited.
    rate_limit_per_min: float = Field(600.0, ge=0)
    rate_limit_burst: int = Field(60, ge=1)
    cache_hit_rate_factor: float = Field(10.0, ge=1)
    batch_max_items: int = Field(32, ge=1, le=1000)
    # The most bytes a POST /v1/jobs/batch body may hold, counted as they arrive
    # (api/bodylimit.py): the batch is parsed in memory, so this, not items x the upload
    # limit (~430 MiB as JSON), bounds what one request can make the API hold.
    batch_max_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    # Probe files for orchestrators: a worker writes ``ready`` once its model is loaded
    # and touches ``alive`` on every heartbeat (``ofa-entail probe ready|alive``).
    health_dir: Path | None = None

    # Network.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555

    @field_validator("url_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("object_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [b.strip() for b in value.split(",") if b.strip()]
        return value

    @field_validator("payload_redis_urls", mode="before")
    @classmethod
    def _split_redis_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return split_urls(value)
        return value

    @field_validator("payload_store")
    @classmethod
    def _check_payload_store(cls, value: str) -> str:
        scheme, sep, _ = value.partition("://")
        if value in ("local", "redis", "durable") or (sep and scheme in PAYLOAD_SCHEMES):
            return value
        raise ValueError(
            "OFA_PAYLOAD_STORE is local, durable, redis, an object-store prefix (s3://, "
            "gs://, az://) or Redis URLs (redis://, rediss://, unix://, sentinel://)"
        )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        _warn_deprecated_names()
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                "visibility_timeout_s must exceed task_time_limit_s, or a healthy task "
                "still running would be delivered to a second worker"
            )
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.environment == "production":
            # Only what every process needs: each component gets only its own secrets
            # (Flower's password reaches Flower alone, which refuses to start without it).
            if not self.redis_url:
                raise ValueError("production needs OFA_REDIS_URL")
            weak = [k for k in self.api_keys if len(k.get_secret_value()) < 24]
            if weak:
                raise ValueError("production API keys must be at least 24 characters")
        return self

    @property
    def interactive_prefetch(self) -> int:
        """Interactive messages a worker holds at once: ``OFA_INTERACTIVE_PREFETCH``, or
        by default four batches' worth, so that while one batch computes the next ones
        are being started and prepared. With two batches' worth a backlog drains in waves
        (the whole prefetch taken, prepared, answered, acknowledged, then the next), at
        about half the rate."""
        return self.interactive_prefetch_setting or 4 * self.batch_size

    @property
    def webhook_deadline_s(self) -> float:
        """One webhook delivery's deadline: ``webhook_timeout_s``, at most half the
        visibility timeout (a delivery still running when its message came back would
        be sent twice, and hold a second thread)."""
        return min(self.webhook_timeout_s, self.visibility_timeout_s / 2)

    @property
    def manifest_line_bytes(self) -> int:
        """The longest manifest line accepted: ``max_manifest_line_bytes``, or a base64
        image at the upload limit plus 64 KiB for the other fields."""
        return self.max_manifest_line_bytes or self.max_upload_bytes * 4 // 3 + 64 * 1024

    @property
    def durable_ack_on(self) -> bool:
        """Whether submissions wait for the durable store's fsync (production default)."""
        if self.durable_ack is None:
            return self.environment == "production"
        return self.durable_ack in ("fsync", "replica")

    @property
    def durable_ack_replicas(self) -> int:
        """Replicas whose append-only file must hold a write before it is acknowledged
        (WAITAOF's second argument): 1 with ``replica``, else 0 (the primary alone)."""
        return 1 if self.durable_ack == "replica" else 0

    @property
    def scans_path(self) -> Path:
        """Where manifests and result files live."""
        return self.scan_dir or self.data_dir / "scans"

    @property
    def payloads_path(self) -> Path:
        """The folder of the ``local`` payload store."""
        return self.payload_dir or self.data_dir / "payloads"

    @property
    def model_ref(self) -> str:
        """What the worker loads: the local directory if set, else the model id."""
        return str(self.model_dir) if self.model_dir else self.model

    @property
    def model_tag(self) -> tuple[str, str]:
        """(id, revision) naming the model in cache keys, task routing and verdicts.

        With ``model_dir`` set, ``model`` and ``model_revision`` still name what that
        directory holds: the API never sees the files, only these two strings.
        """
        return (self.model, self.model_revision)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
