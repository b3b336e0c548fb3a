"""Many teams on one service, in process (the ASGI app against the embedded Valkey, no
worker takes the in-process queue, so jobs stay queued as long as a test needs):
ownership, handles for joins, cancels, webhooks of cancelled jobs, admission that
keeps scans from shedding interactive work, scan caps, and a per-key cache."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from shared.keys import verdict_key
from shared.store.apikeys import Scope
from shared.wire import queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import VERDICT, key_store, run_async, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


def make_key(rdb: redis.Redis, settings, name: str, *scopes: Scope) -> str:
    store = key_store(settings.key_prefix, rdb)
    return store.create(name, frozenset(scopes or (Scope.JOBS, Scope.SCANS)), 0, 1)


@pytest.fixture
def app_for(inproc_settings) -> Iterator:
    """A factory of TestClients on one app: one per API key."""
    made: list[TestClient] = []

    def build(settings=None) -> TestClient:
        client = TestClient(create_app(settings or inproc_settings))
        client.__enter__()
        made.append(client)
        return client

    yield build
    for client in made:
        client.__exit__(None, None, None)


def as_key(client: TestClient, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client: TestClient, token: str, image: bytes, text: str, **data: str):
    return client.post(
        "/v1/jobs",
        data={"text": text, **data},
        files={"image": ("a.jpg", image)},
        headers=as_key(client, token),
    )


def test_another_keys_job_and_scan_are_404_and_an_admin_sees_them(app_for, rdb, inproc_settings):
    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    admin = make_key(rdb, inproc_settings, "ops", Scope.ADMIN, Scope.JOBS, Scope.SCANS)
    client = app_for()
    job = submit(client, a, small_jpeg(seed=301), "a dog")
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    manifest = b'{"id": "1", "image": "x.jpg", "text": "a cat"}\n'
    scan = client.post(
        "/v1/scans",
        files={"manifest": ("m.jsonl", io.BytesIO(manifest))},
        headers=as_key(client, a),
    )
    assert scan.status_code == 202, scan.text
    scan_id = scan.json()["scan_id"]
    reads = [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/scans/{scan_id}"),
        ("GET", f"/v1/scans/{scan_id}/results"),
        ("GET", f"/v1/scans/{scan_id}/report"),
    ]
    cancels = [("DELETE", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/scans/{scan_id}")]
    for method, path in reads + cancels:
        theirs = client.request(method, path, headers=as_key(client, b))
        assert theirs.status_code == 404, (method, path, theirs.text)
        assert job_id not in theirs.text or path.endswith(job_id)  # the detail names the id asked
    # B's attempts changed nothing: the job is still queued, the scan not cancelled.
    assert client.get(f"/v1/jobs/{job_id}", headers=as_key(client, a)).json()["status"] == "queued"
    assert client.get(f"/v1/scans/{scan_id}", headers=as_key(client, a)).json()["status"] != (
        "cancelled"
    )
    for method, path in reads:
        assert client.request(method, path, headers=as_key(client, admin)).status_code == 200, path
        assert client.request(method, path, headers=as_key(client, a)).status_code == 200, path
    assert client.delete(f"/v1/jobs/{job_id}", headers=as_key(client, admin)).status_code == 200


def test_joining_another_keys_job_gives_a_handle_of_its_own(app_for, rdb, inproc_settings, jobs):
    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    client = app_for()
    image = small_jpeg(seed=302)
    first = submit(client, a, image, "a red car")
    joined = submit(client, b, image, "A red  car")  # the same key once normalised
    again = submit(client, a, image, "a red car")
    assert first.status_code == joined.status_code == again.status_code == 202
    a_id, b_id = first.json()["job_id"], joined.json()["job_id"]
    assert b_id != a_id and again.json()["job_id"] == a_id  # the owner rejoins its own job
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 1  # one job computes for both
    # Each sees the job under its own id, and not the other's.
    mine = client.get(f"/v1/jobs/{b_id}", headers=as_key(client, b))
    assert mine.status_code == 200 and mine.json()["job_id"] == b_id
    assert mine.json()["status"] == "queued"
    assert client.get(f"/v1/jobs/{a_id}", headers=as_key(client, b)).status_code == 404
    assert client.get(f"/v1/jobs/{b_id}", headers=as_key(client, a)).status_code == 404
    # The job's end reaches the handle: its verdict, under the handle's id.
    key = verdict_key(*INPROC_MODEL, image, "a red car", None)
    hooks = jobs.succeed(a_id, key, VERDICT, cached=False)
    assert hooks == []
    done = client.get(f"/v1/jobs/{b_id}", headers=as_key(client, b)).json()
    assert done["status"] == "succeeded" and done["verdict"]["label"] == VERDICT.label
    assert done["job_id"] == b_id


def test_a_handle_is_cancelled_alone_and_then_the_owner_can_cancel(
    app_for, rdb, inproc_settings, jobs
):
    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    client = app_for()
    image = small_jpeg(seed=303)
    a_id = submit(client, a, image, "two cups").json()["job_id"]
    b_id = submit(client, b, image, "two cups").json()["job_id"]
    # A's cancel leaves the job to B, who still waits for it.
    first = client.delete(f"/v1/jobs/{a_id}", headers=as_key(client, a)).json()
    assert first["outcome"] == "detached"
    # B gives up its share: B's job ends cancelled, the work stays queued.
    mine = client.delete(f"/v1/jobs/{b_id}", headers=as_key(client, b)).json()
    assert (mine["outcome"], mine["status"]) == ("cancelled", "failed")
    b_view = client.get(f"/v1/jobs/{b_id}", headers=as_key(client, b)).json()
    assert (b_view["status"], b_view["error"]) == ("failed", "cancelled")
    assert client.get(f"/v1/jobs/{a_id}", headers=as_key(client, a)).json()["status"] == "queued"
    # Nobody shares it now: A's cancel cancels it, and its key is free again.
    last = client.delete(f"/v1/jobs/{a_id}", headers=as_key(client, a)).json()
    assert (last["outcome"], last["status"]) == ("cancelled", "failed")
    assert not rdb.exists(jobs.keys.inflight(verdict_key(*INPROC_MODEL, image, "two cups", None)))
    held = run_async(inproc_settings, lambda st: st.reads.aheld())[1]
    assert held == {}  # its image bytes left the held count with its blob


def test_a_cancelled_jobs_webhooks_are_delivered(app_for, rdb, inproc_settings):
    from shared.wire import TASK_JOB_WEBHOOK, WEBHOOK_QUEUE

    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    client = app_for(inproc_settings.model_copy(update={"webhook_secret": SecretStr("s" * 32)}))
    rdb.delete(WEBHOOK_QUEUE)
    image = small_jpeg(seed=304)
    # A public address: the webhook guard resolves it, nothing is sent here.
    hook = {"callback_url": "http://93.184.215.14/hook"}
    a_id = submit(client, a, image, "a kite", **hook).json()["job_id"]
    b_id = submit(client, b, image, "a kite", **hook).json()["job_id"]
    assert client.delete(f"/v1/jobs/{b_id}", headers=as_key(client, b)).json()["outcome"] == (
        "cancelled"
    )
    assert client.delete(f"/v1/jobs/{a_id}", headers=as_key(client, a)).json()["outcome"] == (
        "cancelled"
    )
    sent = []
    for raw in rdb.lrange(WEBHOOK_QUEUE, 0, -1):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == TASK_JOB_WEBHOOK
        sent.append(envelope["headers"]["argsrepr"])
    # One delivery each, each naming the id its submitter knows.
    assert len(sent) == 2 and any(a_id in s for s in sent) and any(b_id in s for s in sent)
    rdb.delete(WEBHOOK_QUEUE)


def test_scans_pending_jobs_never_shed_another_keys_interactive_submission(
    app_for, rdb, inproc_settings, jobs
):
    settings = inproc_settings.model_copy(update={"max_pending_jobs": 50})
    b = make_key(rdb, inproc_settings, "team-b")
    # Scans hold hundreds of unfinished jobs: four times the interactive bound.
    items = [(f"scan-key-{i}", b"img", "t", None) for i in range(200)]
    jobs.create_or_join_many(items, scan_id="big-scan")
    assert rdb.zcard(jobs.keys.job_pending()) == 200
    client = app_for(settings)
    resp = submit(client, b, small_jpeg(seed=305), "a boat")
    assert resp.status_code == 202, resp.text
    # The interactive bound itself still holds.
    tight = app_for(inproc_settings.model_copy(update={"max_pending_jobs": 1}))
    shed = submit(tight, b, small_jpeg(seed=306), "a bus")
    assert shed.status_code == 503 and "1 jobs are waiting" in shed.text


def test_interactive_admission_sheds_on_the_bytes_of_images_held(
    app_for, rdb, inproc_settings, jobs
):
    b = make_key(rdb, inproc_settings, "team-b")
    first, second = small_jpeg(seed=307, size=96), small_jpeg(seed=308, size=96)
    settings = inproc_settings.model_copy(
        update={"max_pending_image_bytes": len(first) + len(second) // 2}
    )
    client = app_for(settings)
    assert submit(client, b, first, "a tree").status_code == 202
    held = run_async(inproc_settings, lambda st: st.reads.aheld())[1]
    assert held == {"interactive": len(first)}
    shown = client.get("/metrics").text
    assert f'ofa_image_bytes_held{{class="interactive"}} {float(len(first))}' in shown
    assert "ofa_interactive_jobs_pending 1.0" in shown
    before = set(rdb.scan_iter(f"{inproc_settings.key_prefix}*"))
    shed = submit(client, b, second, "a tree")
    assert shed.status_code == 503 and "bytes of images are waiting" in shed.text
    assert set(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == before  # nothing stored
    # Joining the job already holding its image adds nothing, so it is let in.
    assert submit(client, b, first, "a tree").status_code == 202


def test_scan_caps_per_key_and_for_the_service(app_for, rdb, inproc_settings):
    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    manifest = b'{"id": "1", "image": "x.jpg", "text": "a cat"}\n'

    def start(client: TestClient, token: str):
        return client.post(
            "/v1/scans",
            files={"manifest": ("m.jsonl", io.BytesIO(manifest))},
            headers=as_key(client, token),
        )

    client = app_for(inproc_settings.model_copy(update={"max_scans_per_key": 2}))
    assert start(client, a).status_code == 202 and start(client, a).status_code == 202
    over = start(client, a)
    assert over.status_code == 429 and "2 scans unfinished" in over.text
    assert over.headers["retry-after"]
    assert start(client, b).status_code == 202  # another key is not held back
    storage = app_for(
        inproc_settings.model_copy(update={"max_scan_bytes_per_key": 2 * len(manifest)})
    )
    c = make_key(rdb, inproc_settings, "team-c")
    assert start(storage, c).status_code == 202 and start(storage, c).status_code == 202
    full = start(storage, c)
    assert full.status_code == 429 and "bytes of manifests" in full.text
    scans_before = len(list(rdb.scan_iter(f"{inproc_settings.key_prefix}scan:*")))
    busy = app_for(inproc_settings.model_copy(update={"max_active_scans": 3}))
    refused = start(busy, make_key(rdb, inproc_settings, "team-d"))
    assert refused.status_code == 503 and "scans are running" in refused.text
    assert len(list(rdb.scan_iter(f"{inproc_settings.key_prefix}scan:*"))) == scans_before


def test_a_per_key_cache_scope_keeps_each_keys_verdicts_apart(app_for, rdb, inproc_settings):
    a = make_key(rdb, inproc_settings, "team-a")
    b = make_key(rdb, inproc_settings, "team-b")
    image = small_jpeg(seed=309)
    shared = app_for()
    one = submit(shared, a, image, "a lamp").json()["job_id"]
    two = submit(shared, b, image, "a lamp").json()["job_id"]
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 1 and one != two  # one job, two handles
    rdb.delete(queue_name(*INPROC_MODEL))
    private = app_for(inproc_settings.model_copy(update={"cache_scope": "key"}))
    image = small_jpeg(seed=310)
    submit(private, a, image, "a lamp")
    submit(private, b, image, "a lamp")
    queued = [json.loads(m) for m in rdb.lrange(queue_name(*INPROC_MODEL), 0, -1)]
    assert len(queued) == 2  # each key computes (and caches) its own verdict
