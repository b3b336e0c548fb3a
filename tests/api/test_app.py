"""The API in process: the ASGI app (lifespan and all) against the embedded Valkey,
without a worker. What a request stores, sends and answers."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from shared.keys import payload_name, verdict_key
from shared.models import CachedVerdict, JobStatus
from shared.wire import queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import API_KEY, VERDICT, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def api(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def stored(rdb: redis.Redis, settings) -> set[bytes]:
    return set(rdb.scan_iter(f"{settings.key_prefix}*"))


def test_a_miss_is_recorded_and_queued_then_joined(api, rdb, inproc_settings):
    image = small_jpeg(seed=101)
    resp = api.post("/v1/jobs", data={"text": "a dog"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.headers["location"] == f"/v1/jobs/{job_id}"
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 1
    polled = api.get(f"/v1/jobs/{job_id}")
    assert polled.status_code == 200 and polled.json()["status"] == JobStatus.QUEUED
    # Texts that normalise the same join the same job.
    again = api.post("/v1/jobs", data={"text": "A  dog"}, files={"image": ("a.jpg", image)})
    assert again.status_code == 202 and again.json()["job_id"] == job_id
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 1


def test_a_cached_verdict_answers_200_without_queueing(api, jobs, rdb, inproc_settings):
    image = small_jpeg(seed=102)
    key = verdict_key(*INPROC_MODEL, image, "a cat", None)
    job_id = jobs.create_or_join(key, image, "a cat", None).job_id
    jobs.succeed(job_id, key, VERDICT, cached=False)
    before = stored(rdb, inproc_settings)
    resp = api.post("/v1/jobs", data={"text": "a cat"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 200, resp.text
    assert CachedVerdict.model_validate_json(resp.content).verdict == VERDICT
    assert stored(rdb, inproc_settings) == before
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 0


@pytest.mark.parametrize(
    ("files", "data", "status", "slug"),
    [
        ({"image": ("a.jpg", b"not an image")}, {"text": "x"}, 415, "unsupported-image"),
        ({"image": ("a.jpg", small_jpeg(seed=3)[:200])}, {"text": "x"}, 400, "bad-image"),
        ({"image": ("a.jpg", small_jpeg(seed=4))}, {"text": ""}, 422, "bad-text"),
        ({"image": ("a.jpg", small_jpeg(seed=5))}, {"text": "x" * 301}, 422, "bad-text"),
        (None, {"text": "x"}, 422, "invalid-input"),
    ],
)
def test_bad_input_stores_nothing(api, rdb, inproc_settings, files, data, status, slug):
    resp = api.post("/v1/jobs", data=data, files=files or {"other": ("x", b"x")})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["type"].endswith("/" + slug)
    assert stored(rdb, inproc_settings) == set()
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 0


def test_unknown_job_and_auth(api, inproc_settings):
    resp = api.get("/v1/jobs/nope")
    assert resp.status_code == 404 and resp.json()["title"] == "Not found"
    with TestClient(create_app(inproc_settings)) as anonymous:
        assert anonymous.get("/v1/jobs/nope").status_code == 401


def test_scan_submit_follow_cancel(api, rdb, inproc_settings):
    manifest = (
        b'{"id": "1", "image": "a.jpg", "text": "one"}\n'
        b'{"id": "2", "image": "b.jpg", "text": "two"}\n'
    )
    resp = api.post("/v1/scans", files={"manifest": ("m.jsonl", io.BytesIO(manifest))})
    assert resp.status_code == 202, resp.text
    scan_id, total = resp.json()["scan_id"], resp.json()["total"]
    assert total == 2
    summary = api.get(f"/v1/scans/{scan_id}").json()
    assert summary["status"] == "queued" and summary["total"] == 2
    cancelled = api.delete(f"/v1/scans/{scan_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    results = api.get(f"/v1/scans/{scan_id}/results", params={"format": "csv"})
    assert results.status_code == 200 and results.text.startswith("id,label,answer")
    assert api.get("/v1/scans/nope").status_code == 404


def test_oversized_manifest_is_payload_too_large(api, rdb, inproc_settings):
    big = b'{"id": "1", "image": "a.jpg", "text": "' + b"x" * 70_000 + b'"}\n'
    resp = api.post("/v1/scans", files={"manifest": ("m.jsonl", io.BytesIO(big))})
    assert resp.status_code == 413, resp.text
    assert resp.json()["type"].endswith("/payload-too-large")
    assert stored(rdb, inproc_settings) == set()


def test_a_csv_cell_may_hold_an_image_at_the_upload_limit(api, inproc_settings):
    import base64

    cell = base64.b64encode(b"\xff" * 150_000).decode()  # 200 KB of base64 > csv's 128 KiB
    manifest = f"id,image_base64,text\n1,{cell},a cat\n".encode()
    settings = inproc_settings.model_copy(update={"max_manifest_bytes": 1024 * 1024})
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        resp = client.post("/v1/scans", files={"manifest": ("m.csv", io.BytesIO(manifest))})
    assert resp.status_code == 202, resp.text
    assert resp.json()["total"] == 1


def test_metrics_show_the_backlog_and_the_reaper(api, jobs, stores, rdb, inproc_settings):
    import time

    job_id = jobs.create_or_join("m1", b"img", "t", None).job_id
    jobs.create_or_join("m2", b"img", "t", None)
    rdb.zadd(jobs.keys.job_deadlines(), {job_id: time.time() - 1})
    stores.reaper_log.record({"resent": 3, "poisoned": 1})
    text = api.get("/metrics").text
    assert "ofa_jobs_pending 2.0" in text and "ofa_jobs_overdue 1.0" in text
    assert "ofa_reaper_resent_total 3.0" in text and "ofa_reaper_poisoned_total 1.0" in text
    assert "ofa_oldest_pending_job_seconds" in text and "ofa_reaper_last_run_seconds" in text


def test_readyz_reports_a_reaper_that_has_not_run(api, jobs, stores, rdb, inproc_settings):
    stores.workers.beat("w:1", 5)
    rdb.delete(jobs.keys.reaper_stats())
    resp = api.get("/readyz")
    assert resp.status_code == 503 and "the reaper has not run ever" in resp.json()["problems"][0]
    stores.reaper_log.record({})
    assert api.get("/readyz").status_code == 200


def test_docs_work_offline_and_declare_how_to_authenticate(api):
    import re

    for page, asset_names in (
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
        ("/redoc", ("redoc.standalone.js",)),
    ):
        html = api.get(page)
        assert html.status_code == 200
        # Every script, stylesheet and icon is served by the API itself.
        refs = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert refs and all(r.startswith("/static/vendor/") for r in refs), refs
        assert "fonts.googleapis" not in html.text and "cdn.jsdelivr" not in html.text
        for name in asset_names:
            [ref] = [r for r in refs if r.endswith(name)]
            asset = api.get(ref)
            assert asset.status_code == 200 and len(asset.content) > 100_000
    spec = api.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer KEY`",
    }
    assert schemes["apiKey"]["type"] == "apiKey" and schemes["apiKey"]["name"] == "X-API-Key"
    post = spec["paths"]["/v1/jobs"]["post"]
    assert {"bearer": []} in post["security"] and {"apiKey": []} in post["security"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_delete_cancels_only_what_nobody_else_waits_for(api, jobs, rdb, inproc_settings):
    def submit(seed: int) -> str:
        resp = api.post(
            "/v1/jobs",
            data={"text": "cancel me"},
            files={"image": ("a.jpg", small_jpeg(seed=seed))},
        )
        assert resp.status_code == 202, resp.text
        return resp.json()["job_id"]

    alone = submit(140)
    gone = api.delete(f"/v1/jobs/{alone}").json()
    assert gone == {"job_id": alone, "outcome": "cancelled", "status": "failed"}
    assert api.get(f"/v1/jobs/{alone}").json()["error"] == "cancelled"
    key = verdict_key(*INPROC_MODEL, small_jpeg(seed=140), "cancel me", None)
    assert not rdb.exists(jobs.keys.inflight(key))
    assert jobs.payloads.get(payload_name(key, alone)) is None
    assert rdb.zscore(jobs.keys.job_deadlines(), alone) is None
    assert submit(140) != alone  # the key is free: a fresh job

    joined = submit(141)
    assert submit(141) == joined  # a second caller joins it
    kept = api.delete(f"/v1/jobs/{joined}").json()
    assert kept["outcome"] == "detached" and kept["status"] == "queued"
    assert api.get(f"/v1/jobs/{joined}").json()["status"] == "queued"

    running = submit(142)
    jobs.start(running, verdict_key(*INPROC_MODEL, small_jpeg(seed=142), "cancel me", None))
    left = api.delete(f"/v1/jobs/{running}").json()
    assert left["outcome"] == "unchanged" and left["status"] == "running"
    assert api.delete("/v1/jobs/nope").status_code == 404


def test_an_unreachable_payload_store_is_a_503_that_stores_and_charges_nothing(
    rdb, inproc_settings, tmp_path
):
    """Submissions are refused with a clear 503 (Retry-After) while the payload store
    cannot take their images: no job, no mark, no message, and the caller's charge is
    given back (a burst of one still admits the next submission)."""
    (tmp_path / "not-a-folder").write_bytes(b"")
    limited = inproc_settings.model_copy(update={"rate_limit_per_min": 1, "rate_limit_burst": 1})
    broken = limited.model_copy(update={"payload_dir": tmp_path / "not-a-folder" / "p"})
    image = small_jpeg(seed=150)
    with TestClient(create_app(broken), headers={"X-API-Key": API_KEY}) as down:
        resp = down.post("/v1/jobs", data={"text": "a bowl"}, files={"image": ("a.jpg", image)})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "5"
        assert resp.headers["content-type"] == "application/problem+json"
        assert "payload store" in resp.json()["detail"]
    key = verdict_key(*INPROC_MODEL, image, "a bowl", None)
    assert not rdb.exists(inproc_settings.key_prefix + f"inflight:{key}")
    assert not [k for k in stored(rdb, inproc_settings) if b":job:" in k]
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 0
    with TestClient(create_app(limited), headers={"X-API-Key": API_KEY}) as up:
        resp = up.post("/v1/jobs", data={"text": "a bowl"}, files={"image": ("a.jpg", image)})
        assert resp.status_code == 202, resp.text
