"""Admission (``api/admission.py``) in process, against the embedded Valkey with no
worker: the order of its steps (cache, image check, shedding, charge, job), what each
refusal costs the caller (nothing, but for the rate limit itself), where the image is
checked, ``?wait=``, and the scans' caps and charge."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

import api.admission as admission
from api import metrics
from api.admission import Admitted, Submission
from api.app import create_app
from api.deps import Services
from shared import wiring
from shared.keys import verdict_key
from shared.models import JobStatus
from shared.store.apikeys import ALL_SCOPES, Caller, Limits, Scope
from tests.conftest import INPROC_MODEL
from tests.helpers import API_KEY, API_KEY_OWNER, VERDICT, encode_image, key_store, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def app_for(inproc_settings) -> Iterator:
    """A factory of TestClients, each on an app of its own settings."""
    made: list[TestClient] = []

    def build(**overrides) -> TestClient:
        client = TestClient(create_app(inproc_settings.model_copy(update=overrides)))
        client.__enter__()
        made.append(client)
        return client

    yield build
    for client in made:
        client.__exit__(None, None, None)


def limited_key(rdb: redis.Redis, settings, per_minute: float, burst: int, *scopes: Scope):
    """A key record with a rate limit: (token, key id)."""
    store = key_store(settings.key_prefix, rdb)
    token = store.create("limited", frozenset(scopes or (Scope.JOBS,)), per_minute, burst)
    return token, token.split("_")[1]


def submit(client: TestClient, token: str, image: bytes, text: str = "a cup"):
    return client.post(
        "/v1/jobs",
        data={"text": text},
        files={"image": ("a.jpg", image)},
        headers={"X-API-Key": token},
    )


def bucket(settings, key_id: str, which: str) -> str:
    return wiring.keys(settings).rate_bucket(key_id, which)


def stored(rdb: redis.Redis, settings) -> set[bytes]:
    """Every key under the prefix but the rate buckets and the key records."""
    skip = (b":rate:", b":apikey")
    return {k for k in rdb.scan_iter(f"{settings.key_prefix}*") if not any(s in k for s in skip)}


def cache(jobs, image: bytes, text: str) -> None:
    key = verdict_key(*INPROC_MODEL, image, text, None)
    jobs.succeed(jobs.create_or_join(key, image, text, None).job_id, key, VERDICT, cached=False)


# --- charging order -------------------------------------------------------------------


def test_a_refused_image_is_not_charged(app_for, rdb, inproc_settings):
    token, key_id = limited_key(rdb, inproc_settings, per_minute=1, burst=1)
    client = app_for()
    for bad in (b"not an image", small_jpeg(seed=401)[:200]):
        resp = submit(client, token, bad)
        assert resp.status_code in (400, 415), resp.text
        assert "ratelimit-limit" not in resp.headers
    assert not rdb.exists(bucket(inproc_settings, key_id, "miss"))
    # The one request the limit allows is still there.
    ok = submit(client, token, small_jpeg(seed=402))
    assert ok.status_code == 202, ok.text
    assert ok.headers["ratelimit-limit"] == "1" and ok.headers["ratelimit-remaining"] == "0"


def test_over_the_limit_is_429_with_retry_after_and_stores_nothing(app_for, rdb, inproc_settings):
    token, _ = limited_key(rdb, inproc_settings, per_minute=1, burst=1)
    client = app_for()
    assert submit(client, token, small_jpeg(seed=403)).status_code == 202
    before = stored(rdb, inproc_settings)
    over = submit(client, token, small_jpeg(seed=404))
    assert over.status_code == 429, over.text
    assert over.headers["content-type"] == "application/problem+json"
    assert over.json()["type"].endswith("/rate-limited") and "new jobs" in over.json()["detail"]
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert over.headers["ratelimit-remaining"] == "0" and over.headers["ratelimit-limit"] == "1"
    assert stored(rdb, inproc_settings) == before


def test_a_cache_hit_charges_the_hit_bucket_not_the_miss_one(app_for, rdb, inproc_settings, jobs):
    token, key_id = limited_key(rdb, inproc_settings, per_minute=1, burst=1)
    image = small_jpeg(seed=405)
    cache(jobs, image, "a cup")
    client = app_for()
    hit = submit(client, token, image)
    assert hit.status_code == 200, hit.text
    # Hits are hit_factor (10) times as generous as misses.
    assert hit.headers["ratelimit-limit"] == "10"
    assert rdb.exists(bucket(inproc_settings, key_id, "hit"))
    assert not rdb.exists(bucket(inproc_settings, key_id, "miss"))
    # The miss bucket used up, hits are still served.
    assert submit(client, token, small_jpeg(seed=406)).status_code == 202
    assert submit(client, token, small_jpeg(seed=407)).status_code == 429
    assert submit(client, token, image).status_code == 200


def test_a_shed_submission_is_not_charged(app_for, rdb, inproc_settings):
    token, key_id = limited_key(rdb, inproc_settings, per_minute=60, burst=5)
    client = app_for(max_pending_jobs=1)
    assert submit(client, token, small_jpeg(seed=408)).status_code == 202
    charged = rdb.get(bucket(inproc_settings, key_id, "miss"))
    shed = submit(client, token, small_jpeg(seed=409))
    assert shed.status_code == 503 and shed.headers["retry-after"] == "5"
    assert shed.json()["type"].endswith("/overloaded")
    assert rdb.get(bucket(inproc_settings, key_id, "miss")) == charged
    # Joining the job already holding the key adds nothing: admitted (and charged).
    joined = submit(client, token, small_jpeg(seed=408))
    assert joined.status_code == 202 and joined.headers["ratelimit-remaining"] == "3"


def test_load_shedding_refuses_new_work_but_not_cache_hits(jobs, rdb, inproc_settings):
    settings = inproc_settings.model_copy(update={"max_pending_jobs": 2})
    cached_image = small_jpeg(seed=120)
    key = verdict_key(*INPROC_MODEL, cached_image, "cached", None)
    done = jobs.create_or_join(key, cached_image, "cached", None, owner=API_KEY_OWNER).job_id
    jobs.succeed(done, key, VERDICT, cached=False)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        for i in range(2):
            resp = client.post(
                "/v1/jobs", data={"text": "x"}, files={"image": ("a.jpg", small_jpeg(seed=121 + i))}
            )
            assert resp.status_code == 202, resp.text
        before = set(rdb.scan_iter(f"{inproc_settings.key_prefix}*"))
        shed_before = metrics.REGISTRY.get_sample_value("ofa_jobs_shed_total")
        shed = client.post(
            "/v1/jobs", data={"text": "x"}, files={"image": ("a.jpg", small_jpeg(seed=130))}
        )
        assert shed.status_code == 503 and shed.headers["retry-after"] == "5"
        assert shed.json()["type"].endswith("/overloaded") and "2 jobs are waiting" in shed.text
        assert set(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == before  # nothing stored
        hit = client.post(
            "/v1/jobs", data={"text": "cached"}, files={"image": ("a.jpg", cached_image)}
        )
        assert hit.status_code == 200  # cache hits are still served
        assert client.get(f"/v1/jobs/{done}").status_code == 200  # and polls
        # Counted once (the counter is the process's: other tests shed too).
        assert f"ofa_jobs_shed_total {shed_before + 1}" in client.get("/metrics").text


def test_shedding_on_held_image_bytes_names_bytes(app_for, rdb, inproc_settings):
    first, second = small_jpeg(seed=410, size=96), small_jpeg(seed=411, size=96)
    client = app_for(max_pending_image_bytes=len(first) + len(second) - 1)
    assert submit(client, API_KEY, first).status_code == 202
    shed = submit(client, API_KEY, second)
    assert shed.status_code == 503 and "bytes of images are waiting" in shed.json()["detail"]
    assert shed.headers["retry-after"] == str(admission.SHED_RETRY_AFTER_S)


def test_a_batch_item_over_the_limit_carries_retry_after(app_for, rdb, inproc_settings):
    token, _ = limited_key(rdb, inproc_settings, per_minute=1, burst=1)
    client = app_for()
    resp = client.post(
        "/v1/jobs/batch",
        data={"text_0": "a", "text_1": "b", "text_2": "c"},
        files={
            "image_0": ("a.jpg", b"not an image"),  # refused: not charged
            "image_1": ("b.jpg", small_jpeg(seed=412)),
            "image_2": ("c.jpg", small_jpeg(seed=413)),
        },
        headers={"X-API-Key": token},
    )
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    assert [i["status"] for i in items] == [415, 202, 429]
    assert items[2]["problem"]["retry_after"] >= 1


# --- where the image is checked -------------------------------------------------------


@pytest.fixture
def where(inproc_settings, monkeypatch) -> Iterator[tuple[TestClient, list[str]]]:
    """The app, and where each of its image checks ran (the real check still runs)."""
    ran: list[str] = []
    check = admission.check_image

    def recorded(data: bytes, max_pixels: int) -> None:
        try:
            asyncio.get_running_loop()
            ran.append("event loop")
        except RuntimeError:
            ran.append("thread")
        check(data, max_pixels)

    monkeypatch.setattr(admission, "check_image", recorded)
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client, ran


def test_small_files_of_few_pixels_are_checked_on_the_event_loop(where):
    client, ran = where
    image = small_jpeg(seed=31)
    assert len(image) <= admission.INLINE_CHECK_BYTES
    resp = client.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 202, resp.text
    assert ran == ["event loop"]


def test_small_files_of_many_pixels_are_checked_in_a_thread(where):
    client, ran = where
    image = encode_image(Image.new("RGB", (1500, 1500), "red"), "WEBP", lossless=True)
    assert len(image) <= admission.INLINE_CHECK_BYTES  # small, yet 2.25 MP to decode
    resp = client.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.webp", image)})
    assert resp.status_code == 202, resp.text
    assert ran == ["thread"]


def test_a_cache_hit_skips_the_image_check(where, jobs):
    client, ran = where
    image = small_jpeg(seed=414)
    cache(jobs, image, "a")
    resp = client.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 200, resp.text
    assert ran == []


# --- admit and finished, called directly ----------------------------------------------


def caller_of(key_id: str = "direct") -> Caller:
    return Caller(key_id, "direct", ALL_SCOPES, Limits(0, 1))


def run_with_services(settings, body) -> None:
    """Run ``body(services)`` on an event loop of its own, the services closed after."""

    async def main() -> None:
        s = Services.build(settings)
        try:
            await body(s)
        finally:
            await s.aclose()

    asyncio.run(main())


def test_admit_creates_joins_then_answers_from_the_cache(inproc_settings, jobs):
    image = small_jpeg(seed=415)

    async def body(s: Services) -> None:
        sub = Submission(image, "a cup", None)
        first = await admission.admit(s, caller_of(), sub)
        assert first.created and first.fresh and first.job_id and first.cached is None
        assert first.limited is None  # the caller has no limit
        again = await admission.admit(s, caller_of(), sub)
        assert (again.created, again.job_id, again.fresh) == (False, first.job_id, False)
        key = verdict_key(*INPROC_MODEL, image, "a cup", None)
        await asyncio.to_thread(jobs.succeed, first.job_id, key, VERDICT, cached=False)
        hit = await admission.admit(s, caller_of(), sub)
        assert hit.cached is not None and hit.job_id is None

    run_with_services(inproc_settings, body)


def test_finished_waits_for_the_jobs_end_within_the_cap(inproc_settings, jobs):
    image = small_jpeg(seed=416)
    key = verdict_key(*INPROC_MODEL, image, "a cup", None)

    async def body(s: Services) -> None:
        admitted = await admission.admit(s, caller_of(), Submission(image, "a cup", None))
        assert await admission.finished(s, admitted, 0) is None  # no wait asked
        assert await admission.finished(s, Admitted(cached=b"{}"), 5) is None  # no job

        async def end_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(jobs.succeed, admitted.job_id, key, VERDICT, cached=False)

        ending = asyncio.create_task(end_soon())
        job = await admission.finished(s, admitted, 10)
        await ending
        assert job is not None and job.status == JobStatus.SUCCEEDED
        assert job.job_id == admitted.job_id and job.verdict == VERDICT

    run_with_services(inproc_settings, body)


def test_finished_gives_up_at_max_wait(inproc_settings):
    import time

    async def body(s: Services) -> None:
        sub = Submission(small_jpeg(seed=417), "a cup", None)
        admitted = await admission.admit(s, caller_of(), sub)
        start = time.monotonic()
        assert await admission.finished(s, admitted, 60) is None  # capped at 0.3 s
        assert time.monotonic() - start < 5

    run_with_services(inproc_settings.model_copy(update={"max_wait_s": 0.3}), body)


def test_a_wait_through_http_that_runs_out_answers_202(app_for):
    client = app_for(max_wait_s=0.2)
    resp = client.post(
        "/v1/jobs?wait=30",
        data={"text": "a"},
        files={"image": ("a.jpg", small_jpeg(seed=418))},
        headers={"X-API-Key": API_KEY},
    )
    assert resp.status_code == 202 and resp.headers["retry-after"] == "1"
    assert resp.headers["location"] == f"/v1/jobs/{resp.json()['job_id']}"


# --- scans ----------------------------------------------------------------------------

MANIFEST = b'{"id": "1", "image": "x.jpg", "text": "a cat"}\n'


def start_scan(client: TestClient, token: str, manifest: bytes = MANIFEST):
    return client.post(
        "/v1/scans",
        files={"manifest": ("m.jsonl", io.BytesIO(manifest))},
        headers={"X-API-Key": token},
    )


def test_a_refused_manifest_gives_its_charge_back(app_for, rdb, inproc_settings):
    token, key_id = limited_key(rdb, inproc_settings, 1, 1, Scope.SCANS)
    client = app_for()
    for _ in range(2):
        bad = start_scan(client, token, b"[1]\n")
        assert bad.status_code == 400, bad.text
        assert not rdb.exists(bucket(inproc_settings, key_id, "miss"))
    ok = start_scan(client, token)
    assert ok.status_code == 202, ok.text
    assert ok.headers["ratelimit-remaining"] == "0" and ok.headers["retry-after"] == "2"
    over = start_scan(client, token)
    assert over.status_code == 429 and over.json()["type"].endswith("/rate-limited")
    assert "scans" in over.json()["detail"] and int(over.headers["retry-after"]) >= 1


def test_a_scan_cap_refuses_before_the_charge(app_for, rdb, inproc_settings):
    token, key_id = limited_key(rdb, inproc_settings, 60, 5, Scope.SCANS)
    client = app_for(max_scans_per_key=1)
    assert start_scan(client, token).status_code == 202
    charged = rdb.get(bucket(inproc_settings, key_id, "miss"))
    capped = start_scan(client, token)
    assert capped.status_code == 429 and capped.json()["type"].endswith("/scan-limit")
    assert rdb.get(bucket(inproc_settings, key_id, "miss")) == charged
