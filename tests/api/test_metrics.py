"""The API's Prometheus metrics (``api/metrics.py``): the counters kept in the durable
store shown as counters at scrape time, what a submission counts (cache lookups,
enqueued, deduplicated), and the request series labelled by route template."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from api import metrics
from api.app import create_app
from api.metrics import StoreCounters
from shared.keys import verdict_key
from tests.conftest import INPROC_MODEL
from tests.helpers import API_KEY, VERDICT, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


def value(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_store_counters_are_the_values_last_read():
    counters = StoreCounters()
    registry = CollectorRegistry()
    registry.register(counters)
    # Nothing read yet: every series at 0, none per scan or outcome.
    assert registry.get_sample_value("ofa_batches_total") == 0
    assert registry.get_sample_value("ofa_reaper_resent_total") == 0
    counters.reaper = {"resent": 3, "poisoned": 1}
    counters.batches = {"batches": 4, "items": 10, "busy_us": 2_500_000}
    counters.webhooks = {"delivered": 5, "failed": 1}
    counters.scan_rows = {"s1": 7}
    got = {
        (name, tuple(sorted(labels.items()))): v
        for name, labels, v in (
            (s.name, s.labels, s.value) for family in registry.collect() for s in family.samples
        )
    }
    assert got[("ofa_reaper_resent_total", ())] == 3
    assert got[("ofa_reaper_poisoned_total", ())] == 1
    assert got[("ofa_reaper_scans_resent_total", ())] == 0
    assert got[("ofa_batches_total", ())] == 4 and got[("ofa_batch_items_total", ())] == 10
    assert got[("ofa_device_busy_seconds_total", ())] == 2.5
    assert got[("ofa_webhook_deliveries_total", (("outcome", "delivered"),))] == 5
    assert got[("ofa_webhook_deliveries_total", (("outcome", "failed"),))] == 1
    assert got[("ofa_scan_rows_finished_total", (("scan", "s1"),))] == 7
    text = generate_latest(registry).decode()
    assert "# TYPE ofa_batches_total counter" in text


@pytest.fixture
def api(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def test_a_submission_counts_its_cache_lookup_and_its_job(api, jobs):
    def post(image: bytes):
        return api.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.jpg", image)})

    miss, hit = (
        value("ofa_cache_lookups_total", {"result": "miss"}),
        value("ofa_cache_lookups_total", {"result": "hit"}),
    )
    enqueued, joined = value("ofa_jobs_enqueued_total"), value("ofa_jobs_deduplicated_total")
    image = small_jpeg(seed=601)
    assert post(image).status_code == 202
    assert post(image).status_code == 202  # joins
    key = verdict_key(*INPROC_MODEL, image, "a", None)
    job_id = jobs.create_or_join(key, image, "a", None).job_id
    jobs.succeed(job_id, key, VERDICT, cached=False)
    assert post(image).status_code == 200
    assert value("ofa_cache_lookups_total", {"result": "miss"}) == miss + 2
    assert value("ofa_cache_lookups_total", {"result": "hit"}) == hit + 1
    assert value("ofa_jobs_enqueued_total") == enqueued + 1
    assert value("ofa_jobs_deduplicated_total") == joined + 1


def test_requests_are_counted_by_route_template_not_by_path(api):
    labels = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "404"}
    before = value("ofa_api_requests_total", labels)
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    before_unmatched = value("ofa_api_requests_total", unmatched)
    for job_id in ("a", "b", "c"):
        assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    assert api.get("/nothing/here").status_code == 404
    assert value("ofa_api_requests_total", labels) == before + 3
    assert value("ofa_api_requests_total", unmatched) == before_unmatched + 1
    timed = {"route": "/v1/jobs/{job_id}", "method": "GET"}
    assert value("ofa_api_request_seconds_count", timed) >= 3
    shown = api.get("/metrics")
    assert shown.status_code == 200
    assert 'ofa_api_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}' in (
        shown.text
    )
