"""The body limit (api/bodylimit.py): the middleware driven message by message, as
uvicorn drives it, and the whole app in process against the embedded Valkey."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from api.app import create_app
from api.bodylimit import BODY_OVERHEAD, DEFAULT_LIMIT, BodyLimitMiddleware, BodyLimits
from shared import wiring
from shared.store.apikeys import Scope as KeyScope
from tests.helpers import key_store, small_jpeg

LIMITS = BodyLimits(job_json=4000, job_form=3000, batch=10_000, scan_form=50_000)


def scope_of(path: str, headers: dict[str, str], method: str = "POST") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


class Peer:
    """The server's side of one request: the body in pieces, what was read of it, and
    the messages the app sent back."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.read = 0  # body bytes handed to the app
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if not self.pieces:
            return {"type": "http.disconnect"}
        piece = self.pieces.pop(0)
        self.read += len(piece)
        return {"type": "http.request", "body": piece, "more_body": bool(self.pieces)}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def problem(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"]).get(name)


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """A route that reads its whole body, as ``request.body()`` does, and answers its length."""
    body = await Request(scope, receive).body()
    await JSONResponse({"length": len(body)})(scope, receive, send)


def run(app, scope: Scope, peer: Peer) -> None:
    asyncio.run(BodyLimitMiddleware(app, LIMITS)(scope, peer.receive, peer.send))


def test_a_body_within_the_limit_passes_untouched():
    peer = Peer([b"x" * 1000] * 4)  # exactly the JSON job limit
    run(echo_length, scope_of("/v1/jobs", {"content-type": "application/json"}), peer)
    assert peer.status == 200 and json.loads(peer.sent[1]["body"]) == {"length": 4000}


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    peer = Peer([b"x" * 1000] * 1000)  # a megabyte, no Content-Length
    run(echo_length, scope_of("/v1/jobs", {"content-type": "application/json"}), peer)
    assert peer.status == 413
    assert peer.problem["type"].endswith("/image-too-large")
    assert peer.header(b"content-type") == b"application/problem+json"
    assert peer.header(b"connection") == b"close"
    assert peer.read == 5000  # the piece that passed 4000, and not one more


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    async def never(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the route ran")

    peer = Peer([b"x" * 10])
    headers = {"content-type": "application/json", "content-length": "10001"}
    run(never, scope_of("/v1/jobs/batch", headers), peer)
    assert peer.status == 413 and peer.problem["type"].endswith("/payload-too-large")
    assert "10000-byte limit of POST /v1/jobs/batch" in peer.problem["detail"]
    assert peer.read == 0


def test_a_route_that_swallows_the_refusal_still_answers_413():
    """A parser that turns the error from ``receive`` into its own answer (a 400 about a
    cut body, say) does not get it out: the 413 does."""

    async def swallowing(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await Request(scope, receive).body()
        except Exception:
            await JSONResponse({"error": "truncated"}, status_code=400)(scope, receive, send)

    peer = Peer([b"x" * 1000] * 100)
    run(swallowing, scope_of("/v1/jobs", {"content-type": "multipart/form-data; boundary=b"}), peer)
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]
    assert peer.status == 413 and peer.read == 4000  # the form limit is 3000


def test_a_route_reading_again_after_the_refusal_is_refused_again():
    reads: list[str] = []

    async def stubborn(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(3):
            try:
                await receive()
                reads.append("read")
            except Exception as exc:
                reads.append(type(exc).__name__)

    peer = Peer([b"x" * 70_000, b"y" * 10])
    run(stubborn, scope_of("/v1/jobs/nope", {}), peer)  # the 64 KiB default
    assert reads == ["_Refused", "_Refused", "_Refused"] and peer.read == 70_000
    assert peer.status == 413


def test_websockets_and_lifespan_pass_through():
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    asyncio.run(BodyLimitMiddleware(app, LIMITS)({"type": "lifespan"}, Peer([]).receive, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    ("method", "path", "ctype", "limit"),
    [
        ("POST", "/v1/jobs", "application/json", 4000),
        ("POST", "/v1/jobs/", "application/json", 4000),
        ("POST", "/v1/jobs", "multipart/form-data", 3000),
        ("POST", "/v1/jobs", "", 4000),
        ("POST", "/v1/jobs/batch", "multipart/form-data", 10_000),
        ("POST", "/v1/jobs/batch", "application/json", 10_000),
        ("POST", "/v1/scans", "multipart/form-data", 50_000),
        ("POST", "/v1/scans", "application/json", DEFAULT_LIMIT),  # a server-side path
        ("GET", "/v1/jobs", "application/json", DEFAULT_LIMIT),
        ("DELETE", "/v1/scans/x", "", DEFAULT_LIMIT),
        ("POST", "/elsewhere", "multipart/form-data", DEFAULT_LIMIT),
    ],
)
def test_each_endpoint_has_its_limit(method, path, ctype, limit):
    assert LIMITS.limit(method, path, ctype) == limit


def test_the_limits_follow_the_settings(inproc_settings):
    limits = BodyLimits.of(inproc_settings.model_copy(update={"batch_max_bytes": 123_456}))
    upload = inproc_settings.max_upload_bytes
    assert limits.job_json == upload * 4 // 3 + BODY_OVERHEAD  # a base64 image fits
    assert limits.job_form == upload + BODY_OVERHEAD
    assert limits.batch == 123_456
    assert limits.scan_form == inproc_settings.max_manifest_bytes + BODY_OVERHEAD


# --- the whole app, in process -----------------------------------------------------


@pytest.fixture
def limited(inproc_settings, rdb: redis.Redis) -> Iterator[tuple[TestClient, str]]:
    """The app with a 64 KiB batch limit, and a key with a rate limit: a charge would
    leave its bucket in the store."""
    keys = wiring.keys(inproc_settings)
    token = key_store(keys.prefix, rdb).create("limited", frozenset(KeyScope), 60, 5)
    settings = inproc_settings.model_copy(update={"batch_max_bytes": 64 * 1024})
    with TestClient(create_app(settings), headers={"X-API-Key": token}) as client:
        yield client, inproc_settings.key_prefix


def state(rdb: redis.Redis, prefix: str) -> set[bytes]:
    """Every key under the prefix but the API key records."""
    return {k for k in rdb.scan_iter(prefix + "*") if b":apikey" not in k}


@pytest.mark.usefixtures("clean_inproc")
def test_refused_bodies_store_nothing_and_charge_nothing(limited, rdb):
    client, prefix = limited
    item = {"text": "a cup", "image_base64": "A" * 40_000}
    refused = [
        client.post("/v1/jobs/batch", json={"items": [item, item]}),
        client.post("/v1/jobs", json={"text": "a cup", "image_base64": "A" * 3_000_000}),
        client.post("/v1/scans", json={"path": "m.jsonl", "pad": "x" * DEFAULT_LIMIT}),
    ]
    for resp in refused:
        assert resp.status_code == 413, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
    assert state(rdb, prefix) == set()
    # The control: an accepted job is charged, and stored.
    ok = client.post("/v1/jobs", data={"text": "a cup"}, files={"image": ("a.jpg", small_jpeg())})
    assert ok.status_code == 202, ok.text
    assert any(b":rate:" in k for k in state(rdb, prefix))


@pytest.mark.usefixtures("clean_inproc")
def test_a_refusal_is_counted_in_the_metrics(limited):
    client, _ = limited

    def refused() -> float:
        series = 'ofa_inputs_rejected_total{type="payload-too-large"} '
        lines = client.get("/metrics").text.splitlines()
        return sum(float(line[len(series) :]) for line in lines if line.startswith(series))

    before = refused()
    resp = client.post("/v1/jobs/batch", content=b"x" * 70_000, headers={"Content-Type": "a/b"})
    assert resp.status_code == 413
    assert refused() == before + 1
