"""Prometheus metrics of the API process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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
ENQUEUED = Counter("ofa_jobs_enqueued_total", "Jobs sent to the workers", registry=REGISTRY)
DEDUPLICATED = Counter(
    "ofa_jobs_deduplicated_total", "Submits joined to a job already in flight", registry=REGISTRY
)
REJECTED = Counter("ofa_inputs_rejected_total", "Bad inputs refused", ["type"], registry=REGISTRY)
