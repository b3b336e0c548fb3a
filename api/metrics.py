"""Prometheus metrics of the API process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "ofa_api_requests_total", "HTTP requests", ["route", "method", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "ofa_api_request_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CACHE = Counter("ofa_cache_lookups_total", "Verdict cache lookups", ["result"], registry=REGISTRY)
CACHE_HIT, CACHE_MISS = CACHE.labels("hit"), CACHE.labels("miss")
ENQUEUED = Counter("ofa_jobs_enqueued_total", "Jobs sent to the workers", registry=REGISTRY)
DEDUPLICATED = Counter(
    "ofa_jobs_deduplicated_total", "Submits joined to a job already in flight", registry=REGISTRY
)
SHED = Counter(
    "ofa_jobs_shed_total", "Submissions refused because too much work waits", registry=REGISTRY
)
RATE_LIMITED = Counter(
    "ofa_requests_rate_limited_total", "Requests refused by a key's rate limit", registry=REGISTRY
)
REJECTED = Counter("ofa_inputs_rejected_total", "Bad inputs refused", ["type"], registry=REGISTRY)

# Read from the durable store at scrape time (every API process reports the same):
# the work the reaper watches over, and what it has done.
JOBS_PENDING = Gauge("ofa_jobs_pending", "Jobs queued or running", registry=REGISTRY)
INTERACTIVE_PENDING = Gauge(
    "ofa_interactive_jobs_pending",
    "Interactive jobs queued or running (what load shedding counts; scans' jobs are not)",
    registry=REGISTRY,
)
HELD_BYTES = Gauge(
    "ofa_image_bytes_held",
    "Bytes of images the durable store holds for unfinished jobs, by class",
    ["class"],
    registry=REGISTRY,
)
MODEL_WORK = Gauge(
    "ofa_model_work",
    "Jobs for this model not yet finished: queued, reserved by a worker, or running "
    "(from the job index, not the broker's list; what the worker autoscaler follows)",
    ["model", "revision"],
    registry=REGISTRY,
)
JOBS_OVERDUE = Gauge(
    "ofa_jobs_overdue", "Unfinished jobs past their dispatch deadline or lease", registry=REGISTRY
)
OLDEST_PENDING = Gauge(
    "ofa_oldest_pending_job_seconds", "Age of the oldest unfinished job", registry=REGISTRY
)
REAPER_AGE = Gauge(
    "ofa_reaper_last_run_seconds",
    "Seconds since the reaper's last pass (-1: never)",
    registry=REGISTRY,
)

WORKERS_ALIVE = Gauge(
    "ofa_workers_alive",
    "Workers serving this model that sent a heartbeat in the last 30 s (what /readyz counts)",
    ["model", "revision"],
    registry=REGISTRY,
)
SCANS_UNFINISHED = Gauge(
    "ofa_scans_unfinished", "Scans queued or running (not yet finalised)", registry=REGISTRY
)
SCANS_OVERDUE = Gauge(
    "ofa_scans_overdue",
    "Unfinished scans whose coordinator went quiet past their deadline (the reaper re-sends "
    "them; one that stays here is stalled)",
    registry=REGISTRY,
)
REDIS_MEMORY_USED = Gauge(
    "ofa_redis_memory_used_bytes",
    "Memory the Redis server uses (INFO memory used_memory; MEMORY STATS where INFO is "
    "not allowed), by store",
    ["store"],
    registry=REGISTRY,
)
REDIS_MEMORY_MAX = Gauge(
    "ofa_redis_memory_max_bytes",
    "The Redis server's maxmemory (0: no cap), by store; absent where the API's Redis user "
    "may not run INFO",
    ["store"],
    registry=REGISTRY,
)


class StoreCounters:
    """Counters kept in the durable store by other processes (the reaper, the workers'
    batches, the coordinators' webhooks, the scans' rows), as Prometheus counters: the
    values last read at scrape time (``api/routes/health.py``)."""

    def __init__(self) -> None:
        self.reaper: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.webhooks: dict[str, int] = {}
        self.scan_rows: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Called by the registry on each scrape."""
        yield from self._reaper()
        batches = self.batches
        for name, text, value in (
            ("ofa_batches", "Model passes the workers ran", batches.get("batches", 0)),
            ("ofa_batch_items", "Items scored in those passes", batches.get("items", 0)),
            (
                "ofa_device_busy_seconds",
                "Seconds the workers' batchers spent in model passes (the devices busy, "
                "summed over workers)",
                batches.get("busy_us", 0) / 1e6,
            ),
        ):
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family
        family = CounterMetricFamily(
            "ofa_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retried (failed, sent again), "
            "failed (given up)",
            labels=["outcome"],
        )
        for outcome, count in sorted(self.webhooks.items()):
            family.add_metric([outcome], count)
        yield family
        family = CounterMetricFamily(
            "ofa_scan_rows_finished",
            "Rows done or failed, per unfinished scan (a scan's series ends when it does)",
            labels=["scan"],
        )
        for scan_id, rows in sorted(self.scan_rows.items()):
            family.add_metric([scan_id], rows)
        yield family

    def _reaper(self) -> Iterator[CounterMetricFamily]:
        helps = {
            "resent": "Overdue jobs the reaper sent again",
            "poisoned": "Jobs failed by the reaper after too many attempts or sends",
            "scans_resent": "Quiet scans whose next slice the reaper sent again",
        }
        for name, text in helps.items():
            family = CounterMetricFamily(f"ofa_reaper_{name}", text)
            family.add_metric([], self.reaper.get(name, 0))
            yield family


STORE = StoreCounters()
REGISTRY.register(STORE)
