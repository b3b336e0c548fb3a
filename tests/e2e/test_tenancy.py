"""Ownership over HTTP, against the running service (uvicorn, worker, coordinator):
another key's job and scan are 404 on every route, an admin key sees them, and a webhook
named by one key reports what that key knows."""

from __future__ import annotations

import io
import time

import httpx
import redis

from shared.store.apikeys import Scope
from tests.helpers import PREFIX, key_store, poll, small_jpeg


def key_client(api: str, rdb: redis.Redis, name: str, *scopes: Scope) -> httpx.Client:
    token = key_store(PREFIX, rdb).create(
        name, frozenset(scopes or (Scope.JOBS, Scope.SCANS)), 0, 1
    )
    return httpx.Client(base_url=api, headers={"X-API-Key": token}, timeout=30)


def test_other_keys_see_nothing_of_a_keys_work_and_an_admin_sees_it_all(
    api, worker, coordinator, rdb, scan_roots
):
    (scan_roots / "images" / "tenancy.jpg").write_bytes(small_jpeg(seed=401))
    with (
        key_client(api, rdb, "team-a") as a,
        key_client(api, rdb, "team-b") as b,
        key_client(api, rdb, "ops", Scope.ADMIN) as admin,
    ):
        job = a.post(
            "/v1/jobs", data={"text": "a quiet street"}, files={"image": ("s.jpg", small_jpeg(401))}
        )
        assert job.status_code in (200, 202), job.text
        job_id = job.json().get("job_id") or poll(a, job.json()["job_id"])["job_id"]
        done = poll(a, job_id)
        assert done["status"] == "succeeded"
        manifest = b'{"id": "1", "image": "tenancy.jpg", "text": "a quiet street"}\n'
        scan = a.post("/v1/scans", files={"manifest": ("m.jsonl", io.BytesIO(manifest))})
        assert scan.status_code == 202, scan.text
        scan_id = scan.json()["scan_id"]
        paths = [
            f"/v1/jobs/{job_id}",
            f"/v1/scans/{scan_id}",
            f"/v1/scans/{scan_id}/results",
            f"/v1/scans/{scan_id}/report",
        ]
        for path in paths:
            refused = b.get(path)
            assert refused.status_code == 404, (path, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert admin.get(path).status_code == 200, path
            assert a.get(path).status_code == 200, path
        for path in (f"/v1/jobs/{job_id}", f"/v1/scans/{scan_id}"):
            assert b.delete(path).status_code == 404, path
        # B's cancel changed nothing: A's scan runs to its end.
        for _ in range(300):
            summary = a.get(f"/v1/scans/{scan_id}").json()
            if summary["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert summary["status"] == "succeeded" and summary["done"] == 1
        # A job B submits with the same inputs is answered from the shared cache: B
        # learns that the verdict exists, never A's job or its id.
        same = b.post(
            "/v1/jobs", data={"text": "a quiet street"}, files={"image": ("s.jpg", small_jpeg(401))}
        )
        assert same.status_code == 200 and job_id not in same.text
