"""``/v1/jobs`` on the app in process: every bad input the right 4xx problem+json with
nothing stored or queued (multipart, JSON, image URLs against a real local image server,
webhook URLs), and an unknown job 404."""

from __future__ import annotations

import base64
import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from api.app import create_app
from shared.wire import queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import API_KEY, WEBHOOK_SECRET, encode_image, photo, small_jpeg

JPEG = encode_image(photo("coffee").resize((64, 48)))


class ImageHost(http.server.BaseHTTPRequestHandler):
    """A local image server with the misbehaviours the URL guards must catch."""

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img.jpg": lambda: self._send(200, JPEG),
            "/to-loopback": lambda: self._redirect(f"http://127.0.0.1:{port}/img.jpg"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data"),
            "/loop": lambda: self._redirect("/loop"),
            "/slow": self._slow,
            "/huge": lambda: self._send(200, b"\xff" * (3 * 1024 * 1024)),
            "/missing": lambda: self._send(404, b"no"),
        }
        routes.get(self.path, lambda: self._send(404, b"?"))()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _slow(self) -> None:
        time.sleep(3)
        self._send(200, JPEG)


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(inproc_settings) -> Iterator[TestClient]:
    """The API in process, its URL limits the end-to-end service's (short timeout, two
    redirects, localhost allowed: the image server's host) and a webhook secret."""
    settings = inproc_settings.model_copy(
        update={
            "url_timeout_s": 1.5,
            "url_max_redirects": 2,
            "url_allow_hosts": ["localhost"],
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
        }
    )
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as c:
        yield c


# Keys the service's own background work touches (heartbeats, the reaper's lock and
# counters, the indexes of unfinished work): their presence is not what a request left.
BACKGROUND = (b":workers:", b":reaper:lock", b":stats:", b":jobs:", b":scans:deadlines")


def snapshot(rdb: redis.Redis, prefix: str) -> tuple[set[bytes], int, int]:
    keys = {k for k in rdb.scan_iter(prefix + "*") if not any(b in k for b in BACKGROUND)}
    unfinished = int(rdb.zcard(prefix + "jobs:pending")) + int(
        rdb.zcard(prefix + "scans:deadlines")
    )
    return keys, int(rdb.llen(queue_name(*INPROC_MODEL))), unfinished


def bomb_png() -> bytes:
    # 5000 x 5000 = 25 MP (limit in the tests: 4 MP); compresses to a few kB.
    return encode_image(Image.new("L", (5000, 5000)), "PNG", optimize=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MULTIPART_CASES = {
    "missing image": ({"text": "a cup"}, None, 422, "invalid-input"),
    "missing text": ({}, ("a.jpg", JPEG), 422, "bad-text"),
    "empty text": ({"text": "   "}, ("a.jpg", JPEG), 422, "bad-text"),
    "text too long": ({"text": "word " * 100}, ("a.jpg", JPEG), 422, "bad-text"),
    "premise too long": ({"text": "a", "premise": "p" * 301}, ("a.jpg", JPEG), 422, "bad-text"),
    "empty image": ({"text": "a cup"}, ("a.jpg", b""), 400, "bad-image"),
    "corrupt image": (
        {"text": "a cup"},
        ("a.jpg", b"\xff\xd8\xff\xe0garbage" * 50),
        400,
        "bad-image",
    ),
    "truncated image": ({"text": "a cup"}, ("a.jpg", JPEG[: len(JPEG) // 2]), 400, "bad-image"),
    "not an image": (
        {"text": "a cup"},
        ("a.pdf", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n"),
        415,
        "unsupported-image",
    ),
    "unsupported format": (
        {"text": "a cup"},
        ("a.ico", encode_image(photo("coffee"), "ICO")),
        415,
        "unsupported-image",
    ),
    "decompression bomb": ({"text": "a cup"}, ("b.png", bomb_png()), 413, "image-too-large"),
    "oversized upload": (
        {"text": "a cup"},
        ("big.jpg", b"\xff" * (2 * 1024 * 1024 + 10)),
        413,
        "image-too-large",
    ),
}


@pytest.mark.parametrize("case", list(MULTIPART_CASES))
def test_bad_multipart(client: TestClient, rdb: redis.Redis, inproc_settings, case: str):
    data, file, status, slug = MULTIPART_CASES[case]
    before = snapshot(rdb, inproc_settings.key_prefix)
    files = {"image": file} if file else {"other": ("x.txt", b"x")}
    resp = client.post("/v1/jobs", data=data, files=files)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["status"] == status and doc["type"].endswith("/" + slug) and doc["detail"]
    assert snapshot(rdb, inproc_settings.key_prefix) == before


def url_cases(host: str) -> dict[str, tuple[str, int, str]]:
    return {
        "ftp scheme": ("ftp://example.com/a.jpg", 400, "only http and https"),
        "file scheme": ("file:///etc/passwd", 400, "only http and https"),
        "loopback": ("http://127.0.0.1:9/a.jpg", 400, "private or local"),
        "private 10/8": ("http://10.0.0.7/a.jpg", 400, "private or local"),
        "metadata": ("http://169.254.169.254/latest/meta-data", 400, "private or local"),
        "ipv6 loopback": ("http://[::1]:9/a.jpg", 400, "private or local"),
        "unclosed ipv6": ("http://[::1/a.jpg", 400, "cannot be parsed"),
        "port out of range": ("http://example.com:99999/a.jpg", 400, "cannot be parsed"),
        "redirect to loopback": (f"{host}/to-loopback", 400, "private or local"),
        "redirect to metadata": (f"{host}/to-metadata", 400, "private or local"),
        "redirect loop": (f"{host}/loop", 400, "redirects"),
        "too slow": (f"{host}/slow", 400, "did not answer"),
        "too large": (f"{host}/huge", 413, "limit"),
        "not found": (f"{host}/missing", 400, "HTTP 404"),
    }


@pytest.mark.parametrize("case", list(url_cases("http://h")))
def test_bad_url(client: TestClient, rdb: redis.Redis, inproc_settings, image_host: str, case: str):
    url, status, words = url_cases(image_host)[case]
    before = snapshot(rdb, inproc_settings.key_prefix)
    resp = client.post("/v1/jobs", json={"text": "a cup", "image_url": url})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert words in resp.json()["detail"]
    assert snapshot(rdb, inproc_settings.key_prefix) == before


JSON_CASES = {
    "bad base64": ({"text": "a", "image_base64": "not*base64!"}, 400, "bad-image"),
    "no image": ({"text": "a"}, 422, "invalid-input"),
    "two images": (
        {"text": "a", "image_base64": b64(JPEG), "image_url": "http://x/a.jpg"},
        422,
        "invalid-input",
    ),
    "text not a string": ({"text": 5, "image_base64": b64(JPEG)}, 422, "invalid-input"),
    "oversized base64": (
        {"text": "a", "image_base64": "A" * (3 * 1024 * 1024)},
        413,
        "image-too-large",
    ),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_bad_json(client: TestClient, rdb: redis.Redis, inproc_settings, case: str):
    body, status, slug = JSON_CASES[case]
    before = snapshot(rdb, inproc_settings.key_prefix)
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["type"].endswith("/" + slug)
    assert snapshot(rdb, inproc_settings.key_prefix) == before


def test_malformed_json_and_media_type(client: TestClient, rdb: redis.Redis, inproc_settings):
    before = snapshot(rdb, inproc_settings.key_prefix)
    resp = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    resp = client.post("/v1/jobs", content=b"hello", headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and resp.json()["type"].endswith("/unsupported-media-type")
    assert snapshot(rdb, inproc_settings.key_prefix) == before


def test_unknown_job_is_404(client: TestClient):
    resp = client.get("/v1/jobs/does-not-exist")
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/problem+json"


def test_webhook_urls_are_guarded_like_image_urls(client: TestClient, rdb, inproc_settings):
    from shared.keys import Keys

    keys = Keys(inproc_settings.key_prefix)
    before = set(rdb.scan_iter(keys.job("*")))
    for url, why in (
        ("http://127.0.0.2:9/hook", "private or local address"),
        ("ftp://example.org/x", "http(s)"),
        ("http://[::1/x", "http(s)"),
    ):
        resp = client.post(
            "/v1/jobs",
            data={"text": "guarded", "callback_url": url},
            files={"image": ("a.jpg", small_jpeg(seed=941))},
        )
        assert resp.status_code == 422 and why in resp.json()["detail"], resp.text
    assert set(rdb.scan_iter(keys.job("*"))) == before
