"""A scan named by an object URL while the object store cannot be reached, in process
against the embedded Valkey: the API answers 503 with Retry-After (as for its other
unavailable dependencies) and stores nothing, neither a scan record nor a folder."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import API_KEY
from tests.objstore import AWS_ENV

pytestmark = pytest.mark.usefixtures("clean_inproc")

BUCKET = "inproc-scans"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port nothing listens on: bound (so no one else takes it), never
    listened on, so a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def client(inproc_settings, closed_port: int, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    settings = inproc_settings.model_copy(
        update={
            "s3_endpoint_url": f"http://127.0.0.1:{closed_port}",
            "s3_allow_http": True,
            "object_buckets": [f"s3://{BUCKET}"],
            "object_timeout_s": 2.0,
        }
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_an_unreachable_object_store_is_a_503_with_nothing_stored(
    client: TestClient, inproc_settings, rdb: redis.Redis
):
    body = {"manifest_url": f"s3://{BUCKET}/m.jsonl"}
    headers = {"X-API-Key": API_KEY, "Idempotency-Key": "store-down-1"}
    scans = inproc_settings.scans_path
    folders_before = set(scans.iterdir()) if scans.exists() else set()
    names_before = set(rdb.scan_iter(f"{inproc_settings.key_prefix}*"))
    resp = client.post("/v1/scans", json=body, headers=headers)
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert int(resp.headers["Retry-After"]) > 0
    problem = resp.json()
    assert problem["status"] == 503 and "object store" in problem["detail"]

    # Nothing stored: no scan record, no idempotency reservation, no scan folder (other
    # tests of this session may have left theirs: compared with before the request).
    new = [k.decode() for k in set(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) - names_before]
    assert not [n for n in new if "scan" in n or "idem" in n], new
    assert (set(scans.iterdir()) if scans.exists() else set()) == folders_before

    # The same request once the caller retries is not answered from a stored refusal:
    # still refused while the store is down (no idempotent replay of a 503).
    again = client.post("/v1/scans", json=body, headers=headers)
    assert again.status_code == 503, again.text
