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


class ReaperCounters:
    """The reaper's counters (kept in Redis by the workers), as Prometheus counters."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Called by the registry on each scrape."""
        helps = {
            "resent": "Overdue jobs the reaper sent again",
            "poisoned": "Jobs failed by the reaper after too many attempts or sends",
            "scans_resent": "Quiet scans whose next slice the reaper sent again",
        }
        for name, text in helps.items():
            family = CounterMetricFamily(f"ofa_reaper_{name}", text)
            family.add_metric([], self.values.get(name, 0))
            yield family


REAPER = ReaperCounters()
REGISTRY.register(REAPER)
