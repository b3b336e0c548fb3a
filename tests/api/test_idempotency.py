"""``POST /v1/scans`` with an ``Idempotency-Key`` in process (embedded Valkey, no worker):
two concurrent starts with the same key and body make one scan, another body is 409
with nothing stored, and a start whose key a concurrent one still holds waits for it."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.admission import upload_digest
from api.app import create_app
from shared import wiring
from tests.helpers import API_KEY, API_KEY_OWNER

pytestmark = pytest.mark.usefixtures("clean_inproc")

MANIFEST = b'{"id": "1", "image": "x.jpg", "text": "a cat"}\n'


@pytest.fixture
def client(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings)) as c:
        yield c


def start(client: TestClient, key: str | None, manifest: bytes = MANIFEST, **data: str):
    headers = {"X-API-Key": API_KEY} | ({"Idempotency-Key": key} if key else {})
    return client.post(
        "/v1/scans",
        files={"manifest": ("m.jsonl", io.BytesIO(manifest))},
        data=data,
        headers=headers,
    )


def scan_records(rdb: redis.Redis, settings) -> set[bytes]:
    return {k for k in rdb.scan_iter(f"{settings.key_prefix}scan:*") if not k.endswith(b":lock")}


def folders(settings) -> set[str]:
    root = settings.scans_path
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_two_concurrent_starts_with_one_key_make_one_scan(client, rdb, inproc_settings):
    barrier = threading.Barrier(4)
    got: list = []
    dirs = folders(inproc_settings)  # other tests' scans share the folder

    def go() -> None:
        barrier.wait()
        got.append(start(client, "nightly-2026-01-01", catalogue="shop-eu"))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in got)
    assert codes == [200, 200, 200, 202], [r.text for r in got]
    assert len({r.json()["scan_id"] for r in got}) == 1
    for r in got:
        if r.status_code == 200:
            assert r.headers["idempotent-replayed"] == "true"
            assert r.json()["catalogue"] == "shop-eu" and r.json()["total"] == 1
    assert len(scan_records(rdb, inproc_settings)) == 1
    assert folders(inproc_settings) - dirs == {got[0].json()["scan_id"]}


def test_the_same_key_with_another_body_is_409_and_stores_nothing(client, rdb, inproc_settings):
    first = start(client, "k-1")
    assert first.status_code == 202, first.text
    records, dirs = scan_records(rdb, inproc_settings), folders(inproc_settings)
    for other in (
        {"manifest": MANIFEST.replace(b"a cat", b"a dog")},
        {"catalogue": "shop-eu"},
        {"format": "csv", "manifest": b"id,image,text\n1,x.jpg,a cat\n"},
    ):
        manifest = other.pop("manifest", MANIFEST)
        refused = start(client, "k-1", manifest, **other)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/idempotency-conflict")
        assert "another request body" in refused.json()["detail"]
    assert scan_records(rdb, inproc_settings) == records
    assert folders(inproc_settings) == dirs
    again = start(client, "k-1")  # the first body still replays
    assert again.status_code == 200 and again.json()["scan_id"] == first.json()["scan_id"]
    # Another key, or none, starts another scan.
    assert start(client, "k-2").status_code == 202
    assert start(client, None).status_code == 202


def test_a_start_waits_for_the_holder_of_its_key(client, rdb, inproc_settings):
    keys = wiring.keys(inproc_settings)
    fields = {"format": "jsonl", "callback_url": None, "catalogue": None}
    digest = upload_digest(io.BytesIO(MANIFEST), fields)
    name = keys.idempotency(API_KEY_OWNER, hashlib.sha256(b"held").hexdigest())
    rdb.set(name, f"{digest} ", ex=60)  # a concurrent start, still creating its scan
    stuck = start(client, "held")
    assert stuck.status_code == 409 and stuck.headers["retry-after"] == "1"
    assert "still creating" in stuck.json()["detail"]

    made = start(client, None)
    assert made.status_code == 202
    scan_id = made.json()["scan_id"]
    timer = threading.Timer(0.5, lambda: rdb.set(name, f"{digest} {scan_id}", keepttl=True))
    timer.start()
    replay = start(client, "held")
    timer.join()
    assert replay.status_code == 200 and replay.json()["scan_id"] == scan_id


def test_a_refused_start_frees_its_key(client, rdb, inproc_settings):
    bad = start(client, "k-bad", b"[1]\n")
    assert bad.status_code == 400
    assert not [k for k in rdb.scan_iter(f"{inproc_settings.key_prefix}idem:*")]
    assert start(client, "k-bad").status_code == 202  # the key is free for another body


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
def test_a_malformed_key_is_refused(client, key):
    headers = {"X-API-Key": API_KEY, "Idempotency-Key": key}
    resp = client.post(
        "/v1/scans",
        files={"manifest": ("m.jsonl", io.BytesIO(MANIFEST))},
        headers={k: v.encode() if isinstance(v, str) else v for k, v in headers.items()},
    )
    assert resp.status_code == 422, resp.text


def test_a_bad_catalogue_name_is_refused(client):
    resp = start(client, None, catalogue="no spaces please")
    assert resp.status_code == 422 and "catalogue" in resp.json()["detail"]
