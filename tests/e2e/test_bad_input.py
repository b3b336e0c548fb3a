"""Bad input that needs the real service: an allow-listed image URL fetched and scored
by the worker, and a broker that is down answered 503 by a real API process. (Every bad
input refused with nothing stored: ``tests/api/routes/test_jobs.py`` and
``test_scans.py``, the app in process.)"""

from __future__ import annotations

import httpx

from tests.api.routes.test_jobs import image_host as image_host  # the fixture
from tests.helpers import small_jpeg


def test_allow_listed_url_is_fetched(client: httpx.Client, worker, image_host: str):
    resp = client.post(
        "/v1/jobs?wait=20", json={"text": "a cup", "image_url": f"{image_host}/img.jpg"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "succeeded"


def test_broker_down_is_503(service_env: dict, tmp_path):
    from tests.helpers import API_KEY, free_port, start_api

    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc, base = start_api(service_env, tmp_path / "api.log", OFA_REDIS_URL=dead)
    try:
        resp = httpx.post(
            f"{base}/v1/jobs",
            data={"text": "a cup"},
            files={"image": ("a.jpg", small_jpeg(99))},
            headers={"X-API-Key": API_KEY},
            timeout=30,
        )
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        assert "retry-after" in resp.headers
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
    finally:
        proc.terminate()
        proc.wait(timeout=10)
