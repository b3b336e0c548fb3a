"""Callers who send more than they may: bodies far over their endpoint's limit, chunked
or with a declared length, and manifests of one endless line, against a real uvicorn
API (and the real coordinator). Each is refused after about its limit has been read,
with the API's (or coordinator's) memory measured from /proc and bounded, nothing
stored and the key's rate limit not charged."""

from __future__ import annotations

import base64
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import httpx
import pytest
import redis

from shared.store.apikeys import Scope
from tests.helpers import key_store, small_jpeg, start_api

PREFIX = "ofa:hostile:"  # this module's API only: nothing else writes here
MiB = 1024 * 1024
UPLOAD = 2 * MiB  # service_env's OFA_MAX_UPLOAD_BYTES
BATCH = 4 * MiB  # OFA_BATCH_MAX_BYTES for this module's API
JOB_JSON_LIMIT = UPLOAD * 4 // 3 + 64 * 1024
JOB_FORM_LIMIT = UPLOAD + 64 * 1024
HOSTILE = 300 * MiB  # what the caller would send
PIECE = 64 * 1024


@pytest.fixture(scope="module")
def hostile(service_env: dict, rdb: redis.Redis, tmp_path_factory) -> Iterator[dict]:
    """A real API process on its own key prefix, and a key with a rate limit (so a
    charge would leave a bucket behind)."""
    for key in rdb.scan_iter(PREFIX + "*"):
        rdb.delete(key)
    token = key_store(PREFIX, rdb).create("hostile", frozenset(Scope), per_minute=60, burst=5)
    proc, base = start_api(
        service_env,
        tmp_path_factory.mktemp("hostile-api") / "api.log",
        OFA_KEY_PREFIX=PREFIX,
        OFA_BATCH_MAX_BYTES=str(BATCH),
        OFA_MAX_MANIFEST_BYTES=str(512 * MiB),
    )
    yield {"base": base, "pid": proc.pid, "token": token, "data": Path(service_env["OFA_DATA_DIR"])}
    proc.terminate()
    proc.wait(timeout=10)
    for key in rdb.scan_iter(PREFIX + "*"):
        rdb.delete(key)


def stored(rdb: redis.Redis) -> set[bytes]:
    """Every key under this module's prefix except the API key's own records."""
    return {k for k in rdb.scan_iter(PREFIX + "*") if b":apikey" not in k}


def reset_peak(pid: int) -> int:
    """Reset the process's resident-memory high-water mark; returns its resident size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS")


def peak(pid: int) -> int:
    """The process's resident-memory high-water mark since ``reset_peak``, in KiB."""
    return _status_kib(pid, "VmHWM")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def open_files(pid: int) -> list[str]:
    """The files (not sockets or pipes) the process holds open: a spooled upload left
    behind would show here, as "/tmp/#... (deleted)"."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # closed meanwhile
            continue
        if target.startswith("/"):
            out.append(target)
    return sorted(out)


class Sent:
    """What a raw HTTP/1.1 client sent before the answer came, and the answer."""

    def __init__(self) -> None:
        self.body_bytes = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    def json(self) -> dict:
        return json.loads(self.body)


def send(
    base: str,
    path: str,
    headers: dict[str, str],
    pieces: Iterator[bytes],
    chunked: bool = True,
    answer_within: float = 30,
) -> Sent:
    """POST ``pieces`` as the body (chunked, or after the declared Content-Length in
    ``headers``), watching for an answer before each piece: a real client that stops
    sending once the server has answered. Counts the body bytes sent before then."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port)) as sock:
        return _send_on(sock, url, path, headers, pieces, chunked, answer_within)


def _send_on(
    sock: socket.socket,
    url: SplitResult,
    path: str,
    headers: dict[str, str],
    pieces: Iterator[bytes],
    chunked: bool,
    answer_within: float,
) -> Sent:
    out = Sent()
    # A small send buffer: bytes counted as sent are bytes the server's side took.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    lines = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        for piece in pieces:
            frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
            view = memoryview(frame)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], 30)
                if readable:
                    raise StopIteration  # the answer is there
                assert writable, "the server neither read nor answered for 30 s"
                view = view[sock.send(view) :]
            out.body_bytes += len(piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except (StopIteration, BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(answer_within)
    raw = b""
    while b"\r\n\r\n" not in raw:
        got = sock.recv(65536)
        assert got, f"no answer: {raw!r}"
        raw += got
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    out.status = int(status_line.split()[1])
    out.headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(out.headers.get("content-length", "0"))
    while len(rest) < length:
        got = sock.recv(65536)
        if not got:
            break
        rest += got
    out.body = rest[:length]
    return out


def endless(prefix: bytes, total: int = HOSTILE, filler: bytes = b"A") -> Iterator[bytes]:
    """``prefix``, then ``filler`` up to ``total`` bytes, generated as they are sent."""
    yield prefix
    piece = filler * (PIECE // len(filler))
    for _ in range((total - len(prefix)) // len(piece)):
        yield piece


def multipart_head(boundary: str, fields: dict[str, str], file_field: str, name: str) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    return "".join(parts).encode()


def refused_within(got: Sent, limit: int, slug: str) -> None:
    assert got.status == 413, (got.status, got.body[:500])
    assert got.headers["content-type"] == "application/problem+json"
    assert got.json()["type"].endswith("/" + slug), got.json()
    # Refused after about the limit: what uvicorn and the sockets buffer on top of it.
    assert got.body_bytes <= 2 * limit, (got.body_bytes, limit)


def auth(hostile: dict, ctype: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {hostile['token']}", "Content-Type": ctype}


# The API may grow by about the limit it read (and a parser's copy of it): far below the
# 300 MiB a read-everything-then-check route would hold.
def bounded_growth(hostile: dict, before: int, limit: int) -> None:
    grown = peak(hostile["pid"]) - before
    assert grown * 1024 <= 2 * limit + 32 * MiB, f"the API grew by {grown} KiB"


def test_a_chunked_json_job_far_over_the_limit_is_refused_as_it_arrives(hostile, rdb):
    before_keys = stored(rdb)
    before = reset_peak(hostile["pid"])
    got = send(
        hostile["base"],
        "/v1/jobs",
        auth(hostile, "application/json"),
        endless(b'{"text": "a cup", "image_base64": "'),
    )
    refused_within(got, JOB_JSON_LIMIT, "image-too-large")
    assert got.body_bytes > JOB_JSON_LIMIT  # it did read up to the limit
    bounded_growth(hostile, before, JOB_JSON_LIMIT)
    assert stored(rdb) == before_keys  # no job, no blob, no rate-limit bucket


def test_a_chunked_json_batch_far_over_its_limit_is_refused_as_it_arrives(hostile, rdb):
    before_keys = stored(rdb)
    before = reset_peak(hostile["pid"])
    item = json.dumps({"text": "a cup", "image_base64": base64.b64encode(small_jpeg()).decode()})
    got = send(
        hostile["base"],
        "/v1/jobs/batch",
        auth(hostile, "application/json"),
        endless(b'{"items": [' + item.encode() + b", ", filler=(item + ", ").encode()),
    )
    refused_within(got, BATCH, "payload-too-large")
    bounded_growth(hostile, before, BATCH)
    assert stored(rdb) == before_keys


def test_a_chunked_multipart_job_far_over_the_limit_is_refused_as_it_arrives(hostile, rdb):
    before_keys = stored(rdb)
    before_files = open_files(hostile["pid"])
    before = reset_peak(hostile["pid"])
    boundary = "hostile-boundary-0123456789"
    got = send(
        hostile["base"],
        "/v1/jobs",
        auth(hostile, f"multipart/form-data; boundary={boundary}"),
        endless(multipart_head(boundary, {"text": "a cup"}, "image", "a.jpg"), filler=b"\xff"),
    )
    refused_within(got, JOB_FORM_LIMIT, "image-too-large")
    bounded_growth(hostile, before, JOB_FORM_LIMIT)
    assert stored(rdb) == before_keys
    deadline = time.monotonic() + 5  # the spooled part is closed once the request ends
    while open_files(hostile["pid"]) != before_files and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_files(hostile["pid"]) == before_files


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_sent(hostile, rdb):
    before_keys = stored(rdb)
    headers = {**auth(hostile, "application/json"), "Content-Length": str(HOSTILE)}
    # No body at all: a server that waited for one would never answer.
    got = send(hostile["base"], "/v1/jobs/batch", headers, iter(()), False, answer_within=5)
    assert got.status == 413 and got.json()["type"].endswith("/payload-too-large")
    assert got.headers.get("connection") == "close"
    assert stored(rdb) == before_keys


def test_a_full_size_image_fits_and_one_byte_more_does_not(hostile, rdb):
    """The JSON limit holds an image at the upload limit in base64 with its fields (the
    route then judges the image itself); a body one byte over the limit, sent by an
    ordinary client with its length declared, is refused at the headers."""
    before_keys = stored(rdb)
    image = base64.b64encode(b"\0" * UPLOAD).decode()  # no image: 415 from the route
    fits = json.dumps({"text": "a cup", "image_base64": image}).encode()
    fits += b" " * (JOB_JSON_LIMIT - len(fits))
    with httpx.Client(base_url=hostile["base"], timeout=30) as client:
        headers = auth(hostile, "application/json")
        judged = client.post("/v1/jobs", content=fits, headers=headers)
        over = client.post("/v1/jobs", content=fits + b" ", headers=headers)
    assert judged.status_code == 415, judged.text
    assert judged.json()["type"].endswith("/unsupported-image")
    assert over.status_code == 413, over.text
    assert over.json()["type"].endswith("/image-too-large")
    assert stored(rdb) == before_keys


@pytest.mark.slow
def test_an_uploaded_manifest_of_one_endless_line_is_refused_with_memory_bounded(hostile, rdb):
    scans = hostile["data"] / "scans"
    before_folders = set(scans.iterdir()) if scans.exists() else set()
    before_keys = stored(rdb)
    before = reset_peak(hostile["pid"])
    boundary = "hostile-manifest-0123456789"
    head = multipart_head(boundary, {}, "manifest", "m.jsonl") + b'{"id": "1", "text": "'

    def manifest() -> Iterator[bytes]:
        yield from endless(head)
        yield f'"}}\r\n--{boundary}--\r\n'.encode()

    got = send(
        hostile["base"],
        "/v1/scans",
        auth(hostile, f"multipart/form-data; boundary={boundary}"),
        manifest(),
    )
    assert got.status == 413, got.body
    assert got.json()["type"].endswith("/manifest-line-too-long"), got.json()
    assert got.body_bytes >= HOSTILE - PIECE  # within the manifest limit: all read
    grown = peak(hostile["pid"]) - before
    assert grown * 1024 <= 64 * MiB, f"the API grew by {grown} KiB reading a 300 MiB line"
    assert stored(rdb) == before_keys
    assert (set(scans.iterdir()) if scans.exists() else set()) == before_folders


@pytest.mark.slow
def test_the_coordinator_makes_an_endless_manifest_line_that_rows_error(
    client: httpx.Client, coordinator, worker, scan_roots: Path
):
    """A server-side manifest whose second line is 300 MiB: the API counts it as a row,
    the coordinator records it as that row's error, skipping it in bounded reads, and
    scores the others."""
    path = scan_roots / "manifests" / "endless-line.jsonl"
    rows = [
        {
            "id": f"r{i}",
            "image_base64": base64.b64encode(small_jpeg(seed=900 + i)).decode(),
            "text": "a thing",
        }
        for i in range(3)
    ]
    try:
        with path.open("wb") as fh:
            fh.write(json.dumps(rows[0]).encode() + b"\n")
            fh.write(b'{"id": "long", "text": "')
            piece = b"x" * MiB
            for _ in range(HOSTILE // MiB):
                fh.write(piece)
            fh.write(b'"}\n')
            for row in rows[1:]:
                fh.write(json.dumps(row).encode() + b"\n")
        assert coordinator.proc is not None
        pid = coordinator.proc.pid
        before = reset_peak(pid)
        resp = client.post("/v1/scans", json={"path": path.name})
        assert resp.status_code == 202, resp.text
        assert resp.json()["total"] == 4
        scan_id = resp.json()["scan_id"]
        deadline = time.monotonic() + 60
        while (summary := client.get(f"/v1/scans/{scan_id}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, summary
            time.sleep(0.2)
        grown = peak(pid) - before
    finally:
        path.unlink(missing_ok=True)
    assert (summary["done"], summary["failed"]) == (3, 1), summary
    results = [
        json.loads(line)
        for line in client.get(f"/v1/scans/{scan_id}/results").text.split("\n")
        if line
    ]
    by_id = {r["id"] or "long": r for r in results}
    assert "longer than" in by_id["long"]["error"]
    assert all(by_id[f"r{i}"]["label"] for i in range(3))
    assert grown * 1024 <= 64 * MiB, f"the coordinator grew by {grown} KiB"
