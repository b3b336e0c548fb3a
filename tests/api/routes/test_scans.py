"""``/v1/scans`` on the app in process: malformed scan bodies and manifests, each a
4xx problem+json with nothing stored and no scan folder made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.routes.test_jobs import client as client
from tests.api.routes.test_jobs import snapshot


def scan_folders(settings) -> set[Path]:
    return set((Path(settings.data_dir) / "scans").glob("*"))


DEEP = b"[" * 20_000 + b"]" * 20_000


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b'{"path": "\xff\xfe"}', {"content-type": "application/json"}, 422),
        (DEEP, {"content-type": "application/json"}, 422),
        (b'{"path": "m.jsonl", "format": 3}', {"content-type": "application/json"}, 400),
        (b'{"path": "m.jsonl", "format": ["csv"]}', {"content-type": "application/json"}, 400),
        (b'{"path": "m.jsonl", "callback_url": 5}', {"content-type": "application/json"}, 422),
        (
            b'{"path": "m.jsonl", "callback_url": "http://[::1"}',
            {"content-type": "application/json"},
            422,
        ),
        (b'{"path": "' + b"a" * 300 + b'.jsonl"}', {"content-type": "application/json"}, 400),
        (b'{"path": "' + b"a/" * 600 + b'"}', {"content-type": "application/json"}, 400),
        (b'{"path": 7}', {"content-type": "application/json"}, 422),
    ],
)
def test_malformed_scan_bodies_are_4xx_and_store_nothing(
    client, rdb, inproc_settings, content, headers, status
):
    folders, before = scan_folders(inproc_settings), snapshot(rdb, inproc_settings.key_prefix)
    resp = client.post("/v1/scans", content=content, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert snapshot(rdb, inproc_settings.key_prefix) == before
    assert scan_folders(inproc_settings) == folders


@pytest.mark.parametrize(
    ("name", "manifest", "why"),
    [
        ("m.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xff", "not UTF-8"),
        ("m.jsonl", DEEP + b"\n", "nested too deeply"),
        ("m.jsonl", b"[1]\n", "JSON objects"),
        ("m.csv", b"id,image,text\n1,a.jpg,\xff\xfe\n", "could not be read"),
    ],
)
def test_malformed_manifests_are_400_and_store_nothing(
    client, rdb, inproc_settings, name, manifest, why
):
    folders, before = scan_folders(inproc_settings), snapshot(rdb, inproc_settings.key_prefix)
    resp = client.post("/v1/scans", files={"manifest": (name, manifest)})
    assert resp.status_code == 400, resp.text
    assert why in resp.json()["detail"]
    assert snapshot(rdb, inproc_settings.key_prefix) == before
    assert scan_folders(inproc_settings) == folders
