"""Running at scale, against real uvicorn processes: API keys with scopes and revocation
(created by the real CLI), per-key rate limits shared by two API processes, load
shedding, cancellation, batch submission and signed, retried job webhooks."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import http.server
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest
import redis

from shared.wire import queue_name
from tests.helpers import API_KEY, WEBHOOK_SECRET, poll, small_jpeg, start_api

# A model no worker serves, under its own prefix: what these APIs queue stays queued.
IDLE_PREFIX = "ofa:scale:"
IDLE_MODEL = ("scale-idle", "r0")


def idle_env(service_env: dict, **extra: str) -> dict:
    return {
        **service_env,
        "OFA_KEY_PREFIX": IDLE_PREFIX,
        "OFA_MODEL": IDLE_MODEL[0],
        "OFA_MODEL_REVISION": IDLE_MODEL[1],
        **extra,
    }


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_key(env: dict, name: str, scopes: str, rate: float = 0, burst: int = 1) -> str:
    got = cli(env, "keys", "create", "--name", name, "--scopes", scopes, "--rate", str(rate),
              "--burst", str(burst), "--json")  # fmt: skip
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)["key"]


def stored(rdb: redis.Redis) -> set[bytes]:
    """Every job, blob and in-flight key under the idle prefix."""
    return {
        k
        for pattern in ("job:*", "blob:*", "inflight:*")
        for k in rdb.scan_iter(IDLE_PREFIX + pattern)
    }


def reset(rdb: redis.Redis) -> None:
    """Forget every job under the idle prefix (keys and their records stay)."""
    for pattern in ("job:*", "blob:*", "inflight:*", "jobs:*"):
        for key in rdb.scan_iter(IDLE_PREFIX + pattern):
            rdb.delete(key)


@pytest.fixture(scope="module")
def idle(service_env: dict, rdb: redis.Redis, tmp_path_factory) -> Iterator[tuple[dict, list]]:
    """Two API processes sharing the idle prefix (load shedding past 6 unfinished jobs)."""
    for key in rdb.scan_iter(IDLE_PREFIX + "*"):
        rdb.delete(key)
    env = idle_env(service_env, OFA_MAX_PENDING_JOBS="6")
    logs = tmp_path_factory.mktemp("scale-api")
    procs = [start_api(env, logs / f"api-{i}.log") for i in range(2)]
    yield env, [base for _, base in procs]
    for proc, _ in procs:
        proc.terminate()
        proc.wait(timeout=10)
    rdb.delete(queue_name(*IDLE_MODEL))


def submit(base: str, key: str, seed: int, text: str = "a thing") -> httpx.Response:
    return httpx.post(
        base + "/v1/jobs",
        headers={"X-API-Key": key},
        data={"text": text},
        files={"image": ("a.jpg", small_jpeg(seed=seed))},
        timeout=30,
    )


def test_key_records_scopes_and_revocation(idle):
    env, (base, other) = idle
    jobs_key = create_key(env, "shop", "jobs")
    reader = create_key(env, "dashboard", "read,admin")  # sees every key's work
    peer = create_key(env, "another-team", "read")
    scanner = create_key(env, "catalogue", "scans")
    listed = cli(env, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = {r["name"]: r for r in json.loads(listed.stdout)}
    assert {"shop", "dashboard", "catalogue"} <= set(records)
    # Only hashes are stored: no key appears in the listing or in Redis.
    assert jobs_key not in listed.stdout and reader not in listed.stdout

    resp = submit(base, jobs_key, 900)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    # An admin read-only key polls (on either API process) but may not submit or
    # cancel: 403. Another team's read key does not see the job at all: 404.
    polled = httpx.get(f"{other}/v1/jobs/{job_id}", headers={"X-API-Key": reader})
    assert polled.status_code == 200
    unseen = httpx.get(f"{other}/v1/jobs/{job_id}", headers={"X-API-Key": peer})
    assert unseen.status_code == 404
    denied = submit(base, reader, 901)
    assert denied.status_code == 403 and "'jobs' scope" in denied.json()["detail"]
    assert (
        httpx.delete(f"{base}/v1/jobs/{job_id}", headers={"X-API-Key": reader}).status_code == 403
    )
    # A scans key cannot submit jobs; the jobs key cannot start scans.
    assert submit(base, scanner, 902).status_code == 403
    manifest = {"manifest": ("m.jsonl", b'{"text": "x", "image_path": "a.jpg"}\n')}
    scan = httpx.post(f"{base}/v1/scans", headers={"X-API-Key": jobs_key}, files=manifest)
    assert scan.status_code == 403
    # Unknown or malformed keys: 401, never 403.
    for bad in ("nope", jobs_key[:-2] + "xx", "ofa_0123456789abcdef_" + "a" * 43):
        assert submit(base, bad, 903).status_code == 401
    assert httpx.get(f"{base}/v1/jobs/{job_id}").status_code == 401

    key_id = jobs_key.split("_")[1]
    revoked = cli(env, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert cli(env, "keys", "revoke", "0" * 16).returncode == 1
    # Refused on both API processes within OFA_KEY_CACHE_S (1 s here).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        codes = {submit(b, jobs_key, 904).status_code for b in (base, other)}
        if codes == {401}:
            break
        time.sleep(0.2)
    assert codes == {401}
    listed = json.loads(cli(env, "keys", "list", "--json").stdout)
    assert next(r for r in listed if r["key_id"] == key_id)["revoked_at"] is not None
    # Cancelling frees the idle queue for the shedding test: another key cannot (404),
    # an operator's jobs,admin key can.
    assert (
        httpx.delete(f"{base}/v1/jobs/{job_id}", headers={"X-API-Key": API_KEY}).status_code == 404
    )
    ops = create_key(env, "ops", "jobs,admin")
    assert httpx.delete(f"{base}/v1/jobs/{job_id}", headers={"X-API-Key": ops}).status_code == 200


def test_rate_limit_is_shared_by_two_api_processes(idle, rdb):
    """12 per minute with a burst of 5: of 16 requests over both processes at once,
    exactly 5 pass; Retry-After says when the next one will, and it does."""
    env, bases = idle
    key = create_key(env, "limited", "jobs", rate=12, burst=5)
    image = small_jpeg(seed=910)
    # A cached verdict is cheap to serve; these misses are all the same image, so each
    # admitted one joins the same job (nothing piles up for the shedding test).

    def one(i: int) -> httpx.Response:
        return httpx.post(
            bases[i % 2] + "/v1/jobs",
            headers={"X-API-Key": key},
            data={"text": "rate"},
            files={"image": ("a.jpg", image)},
            timeout=30,
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 5 + [429] * 11, codes
    refused = [r for r in answers if r.status_code == 429]
    for r in refused:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["ratelimit-limit"] == "5" and r.headers["ratelimit-remaining"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 5
    admitted = [r for r in answers if r.status_code == 202]
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in admitted) == [0, 1, 2, 3, 4]
    # Honest: right away still refused; after Retry-After, admitted.
    again = one(0)
    assert again.status_code == 429
    wait = int(again.headers["retry-after"])
    time.sleep(wait)
    assert one(1).status_code == 202
    assert one(0).status_code == 429  # and only the one that refilled


def test_refused_scans_cost_no_rate_limit(idle, rdb):
    """Bad input changes nothing, not even the caller's budget: with one scan a minute,
    refused manifests leave the key's bucket untouched; a refusal for the rate itself
    comes only once a scan was charged."""
    env, (base, _) = idle
    key = create_key(env, "nightly", "scans", rate=1, burst=1)
    bucket = f"{IDLE_PREFIX}rate:{key.split('_')[1]}:miss"
    headers = {"X-API-Key": key}
    refused = [
        {"files": {"manifest": ("m.jsonl", b"[1]\n")}},  # checked while it is stored
        {"files": {"manifest": ("m.csv", b"id,image,text\n1,a.jpg,\xff\xfe\n")}},
        {"json": {"path": "../elsewhere.jsonl"}},  # outside OFA_MANIFEST_ROOT
        {"files": {"other": ("m.jsonl", b"{}\n")}},  # no manifest field
    ]
    for request in refused * 2:
        resp = httpx.post(base + "/v1/scans", headers=headers, timeout=30, **request)
        assert resp.status_code == 400, resp.text
        assert rdb.exists(bucket) == 0
    # The limit still holds: a manifest missing from the root is refused after the
    # charge (it is looked for while storing), given back, and so is every retry.
    for _ in range(3):
        resp = httpx.post(
            base + "/v1/scans", headers=headers, json={"path": "missing.jsonl"}, timeout=30
        )
        assert resp.status_code == 400, resp.text
    assert rdb.exists(bucket) == 0


def test_load_shedding_and_cancel_on_the_running_service(idle, rdb):
    _, (base, other) = idle
    reset(rdb)  # what earlier tests left queued
    ids = []
    for seed in range(920, 926):  # 6 unfinished jobs: the bound
        resp = submit(base, API_KEY, seed)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["job_id"])
    before = stored(rdb)
    shed = submit(other, API_KEY, 930)
    assert shed.status_code == 503, shed.text
    assert shed.json()["type"].endswith("/overloaded") and shed.headers["retry-after"] == "5"
    assert stored(rdb) == before  # nothing kept for the refused submission
    # Joining work already queued is not new work, and polls still answer.
    assert submit(other, API_KEY, 920).json()["job_id"] == ids[0]
    assert httpx.get(f"{other}/v1/jobs/{ids[1]}", headers={"X-API-Key": API_KEY}).status_code == 200
    metrics = httpx.get(f"{other}/metrics").text
    assert "ofa_jobs_shed_total 1.0" in metrics
    assert f'ofa_model_work{{model="{IDLE_MODEL[0]}",revision="{IDLE_MODEL[1]}"}} 6.0' in metrics

    auth = {"X-API-Key": API_KEY}
    # ids[0] was joined: cancelling detaches, it stays queued for the other caller.
    detached = httpx.delete(f"{base}/v1/jobs/{ids[0]}", headers=auth).json()
    assert detached["outcome"] == "detached" and detached["status"] == "queued"
    # Cancel one nobody joined: room for exactly one new submission.
    assert httpx.delete(f"{base}/v1/jobs/{ids[1]}", headers=auth).json()["outcome"] == "cancelled"
    assert httpx.get(f"{other}/v1/jobs/{ids[1]}", headers=auth).json()["error"] == "cancelled"
    assert submit(other, API_KEY, 931).status_code == 202
    assert submit(other, API_KEY, 932).status_code == 503
    for job_id in ids:
        httpx.delete(f"{base}/v1/jobs/{job_id}", headers=auth)


# --- with the end-to-end worker and coordinator ------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that refuses the first delivery of each job (HTTP 500)."""

    got: ClassVar[list[tuple[dict, bytes, int]]] = []
    refused: ClassVar[set[str]] = set()

    def log_message(self, *_: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        job = self.headers.get("X-OFA-Job", "")
        status = 204 if job in Receiver.refused else 500
        Receiver.refused.add(job)
        Receiver.got.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_job_webhook_is_signed_and_retried(client, worker, coordinator, receiver):
    Receiver.got.clear()
    resp = client.post(
        "/v1/jobs",
        data={"text": "a webhook", "callback_url": receiver},
        files={"image": ("a.jpg", small_jpeg(seed=940))},
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    # A second caller joins the same job with its own webhook: both are called.
    joined = client.post(
        "/v1/jobs",
        json={
            "text": "a webhook",
            "image_base64": __import__("base64").b64encode(small_jpeg(seed=940)).decode(),
            "callback_url": receiver + "?second",
        },
    )
    assert joined.json()["job_id"] == job_id
    job = poll(client, job_id)
    assert job["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len([g for g in Receiver.got if g[2] == 204]) < 2:
        time.sleep(0.1)
    mine = [g for g in Receiver.got if g[0].get("X-OFA-Job") == job_id]
    assert [g[2] for g in mine].count(500) == 1 and [g[2] for g in mine].count(204) == 2, mine
    deliveries = {}
    for headers, body, _ in mine:
        ts = headers["X-OFA-Timestamp"]
        assert abs(time.time() - int(ts)) < 60
        expected = hmac.new(WEBHOOK_SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256)
        assert headers["X-OFA-Signature"] == f"v1={expected.hexdigest()}"
        doc = json.loads(body)
        assert doc["event"] == "job.finished" and doc["delivery_id"] == headers["X-OFA-Delivery"]
        assert doc["job"]["job_id"] == job_id and doc["job"]["verdict"] == job["verdict"]
        deliveries.setdefault(doc["delivery_id"], []).append(headers["X-OFA-Timestamp"])
    # Two webhooks, two delivery ids; the retried one kept its id.
    assert len(deliveries) == 2 and sorted(len(v) for v in deliveries.values()) == [1, 2]


def test_batch_answers_each_item_on_its_own(client, worker, rdb, keys):
    import base64

    done_image = small_jpeg(seed=950)
    first = client.post("/v1/jobs?wait=20", data={"text": "batch"},
                        files={"image": ("a.jpg", done_image)})  # fmt: skip
    assert first.status_code == 200 and first.json()["status"] == "succeeded", first.text
    verdict = first.json()["verdict"]
    before = set(rdb.scan_iter(keys.job("*"))) | set(rdb.scan_iter(keys.payload("*")))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    items = [
        {"text": "batch", "image_base64": b64(done_image)},  # cached
        {"text": "batch", "image_base64": b64(small_jpeg(seed=951))},  # new
        {"text": "batch", "image_base64": b64(b"not an image at all")},  # bad image
        {"text": "x" * 301, "image_base64": b64(small_jpeg(seed=952))},  # text too long
        {"text": "batch", "image_base64": b64(small_jpeg(seed=953))},  # new
    ]
    resp = client.post("/v1/jobs/batch", json={"items": items})
    assert resp.status_code == 200, resp.text
    got = resp.json()["items"]
    assert [g["index"] for g in got] == [0, 1, 2, 3, 4]
    assert [g["status"] for g in got] == [200, 202, 415, 422, 202]
    assert got[0]["verdict"] == verdict
    assert got[2]["problem"]["type"].endswith("/unsupported-image")
    assert "300" in got[3]["problem"]["detail"]
    new_ids = {got[1]["job_id"], got[4]["job_id"]}
    after = set(rdb.scan_iter(keys.job("*"))) | set(rdb.scan_iter(keys.payload("*")))
    added = {k.decode().rsplit(":", 1)[-1] for k in after - before if b":blob:" not in k}
    assert added == new_ids  # the bad items stored nothing
    for job_id in new_ids:
        assert poll(client, job_id)["status"] == "succeeded"

    # Multipart: image_i / text_i; a gap in the numbering refuses the whole call.
    files = {"image_0": ("a.jpg", done_image), "image_1": ("b.jpg", b"")}
    form = client.post("/v1/jobs/batch", data={"text_0": "batch", "text_1": "batch"}, files=files)
    assert [g["status"] for g in form.json()["items"]] == [200, 400], form.text
    assert "job_id" not in form.json()["items"][0]  # absent fields are left out
    assert form.json()["items"][1]["problem"]["detail"] == "image is empty"
    gap = client.post("/v1/jobs/batch", data={"text_0": "a", "text_2": "b"},
                      files={"image_0": ("a.jpg", done_image)})  # fmt: skip
    assert gap.status_code == 422 and "without gaps" in gap.json()["detail"]
    too_many = client.post("/v1/jobs/batch", json={"items": [items[0]] * 33})
    assert too_many.status_code == 422 and "1 to 32 items" in too_many.json()["detail"]
    assert math.isfinite(sum(verdict["probabilities"].values()))
