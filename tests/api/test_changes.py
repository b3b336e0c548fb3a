"""``GET /v1/scans/{id}/changes`` in process (no coordinator): 409 while the scan is
unfinished, 404 for another key's scan."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from shared.store.apikeys import Scope
from tests.helpers import API_KEY, key_store

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_changes_of_an_unfinished_scan_are_409_and_hidden_from_other_keys(inproc_settings, rdb):
    with TestClient(create_app(inproc_settings)) as client:
        started = client.post(
            "/v1/scans",
            files={"manifest": ("m.jsonl", io.BytesIO(b'{"id": "1", "image": "x.jpg"}\n'))},
            data={"catalogue": "shop-eu"},
            headers={"X-API-Key": API_KEY},
        )
        assert started.status_code == 202, started.text
        scan_id = started.json()["scan_id"]
        summary = client.get(f"/v1/scans/{scan_id}", headers={"X-API-Key": API_KEY}).json()
        assert summary["catalogue"] == "shop-eu" and summary["changes"] is None
        got = client.get(f"/v1/scans/{scan_id}/changes", headers={"X-API-Key": API_KEY})
        assert got.status_code == 409 and got.json()["type"].endswith("/scan-unfinished")
        other = key_store(inproc_settings.key_prefix, rdb).create(
            "other", frozenset({Scope.SCANS}), 0, 1
        )
        hidden = client.get(f"/v1/scans/{scan_id}/changes", headers={"X-API-Key": other})
        assert hidden.status_code == 404
