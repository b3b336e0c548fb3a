"""Catalogue scans end to end: real coordinator, worker, API and Valkey."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from shared import wiring
from shared.keys import payload_name, verdict_key
from shared.settings import Settings
from tests.helpers import API_KEY, MODEL, WEBHOOK_SECRET, batch_items, poll, small_jpeg
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

IMAGES = {f"img{i}.jpg": small_jpeg(seed=500 + i, size=40) for i in range(80)}


class Host(http.server.BaseHTTPRequestHandler):
    """Serves IMAGES with ETags (304 on If-None-Match), a third of a second late under
    /slow/, and records callbacks."""

    hits: ClassVar[Counter] = Counter()
    callbacks: ClassVar[list[tuple[dict, bytes]]] = []

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/slow/"):
            time.sleep(0.3)
        body = IMAGES.get(name)
        if body is None:
            Host.hits[(name, 404)] += 1
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = '"' + hashlib.sha1(body).hexdigest() + '"'
        if self.headers.get("If-None-Match") == etag:
            Host.hits[(name, 304)] += 1
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        Host.hits[(name, 200)] += 1
        self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Host.callbacks.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


@pytest.fixture
def scan_client(api: str, worker, coordinator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


def start(client: httpx.Client, rows: list, name: str = "m.jsonl", **data: str) -> dict:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    manifest = ("\n".join(lines) + "\n").encode()
    resp = client.post("/v1/scans", files={"manifest": (name, manifest)}, data=data)
    assert resp.status_code == 202, resp.text
    return resp.json()


def wait_scan(client: httpx.Client, scan_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/scans/{scan_id}").json()
        if doc["status"] in ("succeeded", "cancelled", "failed") and doc["pending"] == 0:
            return doc
        time.sleep(0.1)
    raise TimeoutError(doc)


def results(client: httpx.Client, scan_id: str) -> list[dict]:
    text = client.get(f"/v1/scans/{scan_id}/results").text
    return [json.loads(line) for line in text.splitlines()]


def test_manifest_with_duplicates_cached_and_bad_rows(
    scan_client, host, scan_roots: Path, direct, rdb, keys
):
    img = IMAGES
    (scan_roots / "images" / "b.jpg").write_bytes(img["img1.jpg"])
    # A verdict cached before the scan (an interactive job).
    pre = scan_client.post(
        "/v1/jobs?wait=20", data={"text": "pre cached"}, files={"image": ("x.jpg", img["img5.jpg"])}
    )
    assert pre.json()["status"] == "succeeded"
    sha_ok = hashlib.sha256(img["img10.jpg"]).hexdigest()
    rows = [
        {"id": "r0", "image": f"{host}/img/img0.jpg", "text": "a red box"},
        {"id": "r1", "image": "b.jpg", "text": "b"},
        {
            "id": "r2",
            "image_base64": base64.b64encode(img["img2.jpg"]).decode(),
            "text": "c",
            "premise": "p",
        },
        {"id": "r3", "image": f"{host}/img/img0.jpg", "text": "a red box"},  # duplicate
        {"id": "r4", "image_url": f"{host}/img/img0.jpg", "text": "A red   box"},  # same key
        {
            "id": "r5",
            "image_base64": base64.b64encode(img["img5.jpg"]).decode(),
            "text": "pre cached",
        },
        {"id": "r6", "image": f"{host}/img/img6.jpg"},  # no text
        {"id": "r7", "image_base64": "%%%not base64", "text": "x"},
        {"id": "r8", "image": f"{host}/img/missing.jpg", "text": "x"},
        {"id": "r9", "image": "../../etc/passwd", "text": "x"},
        {"id": "r10", "image": f"{host}/img/img10.jpg", "text": "sha ok", "sha256": sha_ok},
        {"id": "r11", "image": f"{host}/img/img11.jpg", "text": "sha wrong", "sha256": sha_ok},
        "this line is not json",
        *(
            {"id": f"g{i}", "image": f"{host}/img/img{20 + i}.jpg", "text": f"item {i}"}
            for i in range(12)
        ),
        {"id": "r-dup-path", "image_path": "b.jpg", "text": "B"},
    ]
    items_before = batch_items(rdb, keys)
    scan = start(scan_client, rows)
    assert scan["total"] == len(rows)
    done = wait_scan(scan_client, scan["scan_id"])
    assert done["status"] == "succeeded"
    out = results(scan_client, scan["scan_id"])
    assert [r["id"] for r in out] == [
        r["id"] if isinstance(r, dict) else "" for r in rows
    ]  # one line per row, in manifest order
    by_id = {r["id"]: r for r in out}
    failed = {"r6", "r7", "r8", "r9", "r11", ""}
    assert {r["id"] for r in out if r["error"]} == failed
    assert "missing text" in by_id["r6"]["error"]
    assert "base64" in by_id["r7"]["error"]
    assert "404" in by_id["r8"]["error"]
    assert "outside the image root" in by_id["r9"]["error"]
    assert "sha256" in by_id["r11"]["error"]
    assert by_id["r5"]["cached"] is True
    assert done["failed"] == len(failed) and done["done"] == len(rows) - len(failed)
    assert done["total"] == len(rows) and done["eta_s"] == 0.0
    # Verdicts equal the runtime's own, row by row.
    sources = {
        "r0": ("img0.jpg", "a red box", None),
        "r1": ("img1.jpg", "b", None),
        "r2": ("img2.jpg", "c", "p"),
        "r10": ("img10.jpg", "sha ok", None),
        **{f"g{i}": (f"img{20 + i}.jpg", f"item {i}", None) for i in range(12)},
    }
    for row_id, (name, text, premise) in sources.items():
        expected = direct.predict(img[name], text, premise)
        assert by_id[row_id]["label"] == expected.label
        for label, p in expected.probabilities.items():
            assert by_id[row_id]["probabilities"][label] == pytest.approx(p, abs=1e-6)
    for dup, orig in (("r3", "r0"), ("r4", "r0"), ("r-dup-path", "r1")):
        assert by_id[dup]["probabilities"] == by_id[orig]["probabilities"]
    # Duplicates computed once: r0/r3/r4 one key, r1/r-dup-path one key, r5 cached.
    assert batch_items(rdb, keys) - items_before == len(sources)
    # The scan's finished job records do not outlive it by long: Redis holds the window.
    scan_jobs = [
        k for k in rdb.scan_iter(keys.job("*")) if rdb.hget(k, "scan") == scan["scan_id"].encode()
    ]
    assert len(scan_jobs) == len(sources)
    assert all(0 < rdb.ttl(k) <= 60 for k in scan_jobs)

    # The same manifest again finishes from the cache, re-validating URLs (304s).
    def downloads() -> int:  # img11's row has a wrong sha256: it is re-fetched to fail again
        return sum(
            n for (name, code), n in Host.hits.items() if code == 200 and name != "img11.jpg"
        )

    fetched_before = downloads()
    again = start(scan_client, rows)
    redo = wait_scan(scan_client, again["scan_id"])
    errors = [(r["id"], r["error"]) for r in results(scan_client, again["scan_id"]) if r["error"]]
    assert redo["done"] == done["done"] and redo["cached"] == redo["done"], errors
    assert downloads() == fetched_before
    assert Host.hits[("img0.jpg", 304)] >= 1
    assert [r["probabilities"] for r in results(scan_client, again["scan_id"])] == [
        r["probabilities"] for r in out
    ]


def test_cancel_keeps_finished_results(scan_client, host):
    rows = [
        # Slow images: 5 chunks of 6 rows take 1.5 s or more, the cancel comes at 0.5 s.
        {"id": f"c{i}", "image": f"{host}/slow/img{40 + i}.jpg", "text": f"cancel {i}"}
        for i in range(30)
    ]
    scan = start(scan_client, rows)
    time.sleep(0.5)
    resp = scan_client.delete(f"/v1/scans/{scan['scan_id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    doc = wait_scan(scan_client, scan["scan_id"])
    assert doc["status"] == "cancelled"
    out = results(scan_client, scan["scan_id"])
    assert len(out) < len(rows)  # it stopped reading
    assert all(r["label"] or r["error"] == "scan cancelled" for r in out)
    time.sleep(2)  # a cancelled scan stays cancelled
    assert scan_client.get(f"/v1/scans/{scan['scan_id']}").json()["status"] == "cancelled"


@pytest.mark.slow
def test_cancel_spares_jobs_others_wait_for(
    scan_client, client, host, worker, direct, rdb, keys, payload_settings
):
    """Scan A shares two keys with scan B and one with an interactive job; cancelling A
    drops only its own key's job, B and the interactive job get verdicts, and A's
    callback arrives with status cancelled."""
    Host.callbacks.clear()
    shared_x, shared_y, own_z = "img70.jpg", "img71.jpg", "img72.jpg"
    row = lambda i, name: {"id": i, "image": f"{host}/img/{name}", "text": f"share {name}"}  # noqa: E731
    worker.kill()  # nothing computes until every job is queued and A is cancelled
    try:
        a = start(
            scan_client,
            [row("ax", shared_x), row("ay", shared_y), row("az", own_z)],
            callback_url=f"{host}/hook-a",
        )
        deadline = time.monotonic() + 30
        while scan_client.get(f"/v1/scans/{a['scan_id']}").json()["pending"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        b = start(scan_client, [row("bx", shared_x), row("by", shared_y)])
        while scan_client.get(f"/v1/scans/{b['scan_id']}").json()["pending"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        joined = client.post(
            "/v1/jobs",
            data={"text": f"share {shared_x}"},
            files={"image": ("x.jpg", IMAGES[shared_x])},
        )
        assert joined.status_code == 202, joined.text
        assert scan_client.delete(f"/v1/scans/{a['scan_id']}").json()["status"] == "cancelled"
    finally:
        worker.start()
    done_a = wait_scan(scan_client, a["scan_id"])
    assert done_a["status"] == "cancelled"
    done_b = wait_scan(scan_client, b["scan_id"])
    assert done_b["status"] == "succeeded" and done_b["done"] == 2 and done_b["failed"] == 0
    for r in results(scan_client, b["scan_id"]):
        name = shared_x if r["id"] == "bx" else shared_y
        want = direct.predict(IMAGES[name], f"share {name}")
        assert r["label"] == want.label
        assert r["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    job = poll(client, joined.json()["job_id"])
    assert job["status"] == "succeeded"
    assert job["verdict"]["probabilities"] == pytest.approx(
        direct.predict(IMAGES[shared_x], f"share {shared_x}").probabilities, abs=1e-6
    )
    a_rows = {r["id"]: r for r in results(scan_client, a["scan_id"])}
    assert a_rows["az"]["error"] == "scan cancelled"
    deadline = time.monotonic() + 30
    while not any(h.get("X-OFA-Scan") == a["scan_id"] for h, _ in Host.callbacks):
        assert time.monotonic() < deadline, "no callback for the cancelled scan"
        time.sleep(0.1)
    body = next(b for h, b in Host.callbacks if h.get("X-OFA-Scan") == a["scan_id"])
    assert json.loads(body)["status"] == "cancelled"
    # Nothing left behind: no payload, no deadline, for any of these keys' jobs.
    payloads = wiring.payload_store(Settings(_env_file=None, **payload_settings))  # type: ignore[call-arg, arg-type]
    for name in (shared_x, shared_y, own_z):
        key = verdict_key(*MODEL, IMAGES[name], f"share {name}", None)
        mark = rdb.get(keys.inflight(key))
        assert mark is None or rdb.zscore(keys.job_deadlines(), mark) is None
        assert mark is None or payloads.get(payload_name(key, mark.decode())) is None


@pytest.mark.slow
def test_coordinator_killed_mid_scan_resumes(scan_client, host, coordinator, direct):
    rows = [
        {"id": f"k{i}", "image": f"{host}/img/img{i}.jpg", "text": f"resume {i}"} for i in range(40)
    ]
    scan = start(scan_client, rows)
    deadline = time.monotonic() + 30
    while scan_client.get(f"/v1/scans/{scan['scan_id']}").json()["done"] < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    coordinator.kill()
    partial = scan_client.get(f"/v1/scans/{scan['scan_id']}").json()
    assert partial["status"] == "running" and partial["done"] < len(rows)
    coordinator.start()
    doc = wait_scan(scan_client, scan["scan_id"], timeout=120)
    assert doc["status"] == "succeeded" and doc["done"] == len(rows) and doc["failed"] == 0
    out = results(scan_client, scan["scan_id"])
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for row, line in zip(rows, out, strict=True):
        i = int(row["id"][1:])
        expected = direct.predict(IMAGES[f"img{i}.jpg"], row["text"])
        assert line["label"] == expected.label
        assert line["probabilities"]["entailment"] == pytest.approx(
            expected.probabilities["entailment"], abs=1e-6
        )


@pytest.mark.slow
def test_interactive_job_is_not_stuck_behind_a_scan(scan_client, host, worker, client):
    worker.kill()  # a worker slow enough that the scan takes a while
    worker.start(OFA_BATCH_WAIT_MS="150", OFA_BATCH_SIZE="4")
    try:
        rows = [
            {"id": f"s{i}", "image": f"{host}/img/img{i}.jpg", "text": f"slow {i}"}
            for i in range(60, 80)
        ]
        rows += [
            {"id": f"t{i}", "image": f"{host}/img/img{i}.jpg", "text": f"slow {i}"}
            for i in range(0, 40)
        ]
        scan = start(scan_client, rows)
        deadline = time.monotonic() + 30
        while scan_client.get(f"/v1/scans/{scan['scan_id']}").json()["pending"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        resp = client.post(
            "/v1/jobs?wait=30",
            data={"text": "interactive during scan"},
            files={"image": ("i.jpg", small_jpeg(seed=4242))},
        )
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["status"] == "succeeded"
        doc = wait_scan(scan_client, scan["scan_id"], timeout=120)
        assert doc["status"] == "succeeded"
        assert job["finished_at"] < doc["finished_at"]
        # It overtook the scan's queue rather than waiting for it to drain.
        scan_time = doc["finished_at"] - doc["started_at"]
        assert job["finished_at"] - job["created_at"] < scan_time / 2
    finally:
        worker.kill()
        worker.start()


def test_callback_is_signed(scan_client, host):
    Host.callbacks.clear()
    rows = [{"id": "cb", "image": f"{host}/img/img3.jpg", "text": "callback"}]
    scan = start(scan_client, rows, callback_url=f"{host}/hook")
    wait_scan(scan_client, scan["scan_id"])
    deadline = time.monotonic() + 20
    while not Host.callbacks:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    headers, body = Host.callbacks[0]
    headers = {k.lower(): v for k, v in headers.items()}
    timestamp = headers["x-ofa-timestamp"]
    expected = hmac.new(
        WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert headers["x-ofa-signature"] == f"v1={expected}"
    assert abs(time.time() - int(timestamp)) < 60
    summary = json.loads(body)
    assert summary["scan_id"] == scan["scan_id"] and summary["status"] == "succeeded"
    assert summary["done"] == 1


def test_cli_scan_csv_manifest(api, worker, coordinator, service_env, host, tmp_path):
    manifest = tmp_path / "catalogue.csv"
    manifest.write_text(
        "id,image,text,premise\n"
        + "".join(f'p{i},{host}/img/img{i}.jpg,"cli item {i}, with a comma",\n' for i in range(5))
        + "bad,,no image,\n"
    )
    out = tmp_path / "results.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "scan",
            str(manifest),
            "--out",
            str(out),
            "--url",
            api,
            "--api-key",
            API_KEY,
        ],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr  # succeeded, with a row failed ("bad")
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,label,answer,p_entailment")
    assert [line.split(",")[0] for line in lines[1:]] == [*(f"p{i}" for i in range(5)), "bad"]
    assert "missing image" in lines[-1]
    assert "5 done" in proc.stderr


def test_server_side_manifest_and_bad_manifests(scan_client, host, scan_roots, rdb):
    (scan_roots / "manifests" / "nightly.jsonl").write_text(
        json.dumps({"id": "n0", "image": f"{host}/img/img7.jpg", "text": "server side"}) + "\n"
    )
    resp = scan_client.post("/v1/scans", json={"path": "nightly.jsonl"})
    assert resp.status_code == 202, resp.text
    assert wait_scan(scan_client, resp.json()["scan_id"])["done"] == 1

    before = set(rdb.scan_iter("ofa:test:scan:*"))
    for body in ({"path": "../../etc/passwd"}, {"path": "nope.jsonl"}, {"nopath": 1}):
        bad = scan_client.post("/v1/scans", json=body)
        assert bad.status_code in (400, 422), bad.text
        assert bad.headers["content-type"] == "application/problem+json"
    for name, content in (("e.jsonl", b""), ("x.jsonl", b"not json\n"), ("h.csv", b"a,b\n1,2\n")):
        bad = scan_client.post("/v1/scans", files={"manifest": (name, content)})
        assert bad.status_code == 400, bad.text
    bad = scan_client.post(
        "/v1/scans",
        files={"manifest": ("m.jsonl", b'{"id":1}\n')},
        data={"callback_url": "ftp://x/y"},
    )
    assert bad.status_code == 422
    assert set(rdb.scan_iter("ofa:test:scan:*")) == before


@pytest.mark.slow
def test_a_scan_whose_slices_keep_crashing_fails_with_its_callback(
    scan_client, host, coordinator, scan_roots, rdb, keys
):
    """The server-side manifest vanishes before the coordinator reads it: each slice
    crashes, is tried again after a pause, and after OFA_SCAN_MAX_SLICE_FAILURES the
    scan ends failed, says why, and sends its callback."""
    Host.callbacks.clear()
    path = scan_roots / "manifests" / "vanishing.jsonl"
    path.write_text(json.dumps({"id": "v0", "image": f"{host}/img/img8.jpg", "text": "v"}) + "\n")
    coordinator.kill()  # so that the file is gone before any slice runs
    try:
        resp = scan_client.post(
            "/v1/scans", json={"path": "vanishing.jsonl", "callback_url": f"{host}/hook-v"}
        )
        assert resp.status_code == 202, resp.text
        path.unlink()
    finally:
        coordinator.start()
    scan_id = resp.json()["scan_id"]
    doc = wait_scan(scan_client, scan_id, timeout=60)
    assert doc["status"] == "failed"
    assert "failed 3 times in a row" in doc["error"] and "vanishing.jsonl" in doc["error"]
    deadline = time.monotonic() + 30
    while not any(h.get("X-OFA-Scan") == scan_id for h, _ in Host.callbacks):
        assert time.monotonic() < deadline, "no callback for the failed scan"
        time.sleep(0.1)
    body = next(b for h, b in Host.callbacks if h.get("X-OFA-Scan") == scan_id)
    assert json.loads(body)["status"] == "failed"
    assert rdb.zscore(keys.scan_deadlines(), scan_id) is None  # nothing left to reap


def test_report_over_gold_labels(api, worker, coordinator, service_env, direct, tmp_path):
    """Rows with a gold label give accuracy and a confusion matrix equal to what the
    test computes itself from direct scoring; rows without one are not counted."""
    import base64

    from ofa_entail_client import Client

    golds = ["entailment", "contradiction", "neutral", "Entailment", "neutral", None, "bogus"]
    rows, images = [], {}
    for i, gold in enumerate(golds):
        image = small_jpeg(seed=3000 + i, size=40)
        images[f"g{i}"] = image
        row = {
            "id": f"g{i}",
            "image": "data:image/jpeg;base64," + base64.b64encode(image).decode(),
            "text": f"gold {i}",
        }
        if gold is not None:
            row["label"] = gold
        rows.append(row)
    manifest = tmp_path / "gold.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, report_file = tmp_path / "results.jsonl", tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "scan",
            str(manifest),
            "--url",
            api,
            "--api-key",
            API_KEY,
            "--out",
            str(out),
            "--report",
            str(report_file),
        ],
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # Expected, computed here: direct scoring against the valid gold labels.
    labels = ("entailment", "contradiction", "neutral")
    confusion = {g: dict.fromkeys(labels, 0) for g in labels}
    for i, gold in enumerate(golds):
        if gold is None or gold.lower() not in labels:
            continue
        predicted = direct.predict(images[f"g{i}"], f"gold {i}").label
        confusion[gold.lower()][predicted] += 1
    counted = sum(sum(row.values()) for row in confusion.values())
    assert counted == 5
    assert len(out.read_text().splitlines()) == len(rows)
    with Client(api, API_KEY) as ofa:
        scans = [line for line in done.stderr.splitlines() if line.startswith("scan ")]
        scan_id = scans[-1].split()[1]
        report = ofa.scan_report(scan_id)
    assert report.labelled == 5
    assert report.confusion == confusion
    assert report.accuracy == pytest.approx(sum(confusion[g][g] for g in labels) / 5)
    for label in labels:
        low = report.curves[label][0]  # threshold 0: everything is predicted
        assert low.threshold == 0.0 and low.precision == pytest.approx(
            sum(confusion[label].values()) / 5
        )
        assert low.recall == (1.0 if sum(confusion[label].values()) else None)
    page = report_file.read_text()
    assert (
        "<svg" in page
        and "Confusion matrix" in page
        and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    )


def test_catalogue_scans_list_what_changed_since_the_previous_one(
    scan_client, host, api, service_env, rdb, keys
):
    """Two scans of one catalogue, the second with a label flipped, a row added and one
    removed, one that starts failing and one that recovers: exactly those changes, in
    the API, the report and the webhook's counts; then the CLI, scheduled-style."""
    import uuid

    catalogue = f"shop-{uuid.uuid4().hex[:8]}"
    bad = "data:image/jpeg;base64," + base64.b64encode(b"not an image").decode()

    def url(name: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(IMAGES[name]).decode()

    # The tiny model gives one label whatever the image: the flipped label is crafted
    # in the verdict cache between the scans (a row whose key is cached takes that).
    flip_image = small_jpeg(seed=7001, size=40)
    flip_url = "data:image/jpeg;base64," + base64.b64encode(flip_image).decode()

    def row(item: str | None, image: str, text: str = "catalogue row") -> dict:
        return {"image": image, "text": text} | ({"id": item} if item else {})

    first = start(
        scan_client,
        [
            row("keep", url("img31.jpg")),
            row("flip", flip_url, "catalogue flip"),
            row("breaks", url("img32.jpg")),
            row("heals", bad),
            row("gone", url("img33.jpg")),
            row("dup", url("img34.jpg")),
        ],
        catalogue=catalogue,
    )
    one = wait_scan(scan_client, first["scan_id"])
    assert one["status"] == "succeeded" and one["catalogue"] == catalogue
    assert one["baseline_scan"] is None and one["changes"] is None  # nothing to compare
    assert scan_client.get(f"/v1/scans/{one['scan_id']}/changes").text == ""
    was = next(r for r in results(scan_client, one["scan_id"]) if r["id"] == "flip")["label"]
    now = "contradiction" if was != "contradiction" else "entailment"
    flip_key = verdict_key(*MODEL, flip_image, "catalogue flip", None)
    probs = {"entailment": 0.05, "contradiction": 0.05, "neutral": 0.05} | {now: 0.9}
    crafted = {
        "label": now,
        "answer": "no" if now == "contradiction" else "yes",
        "probabilities": probs,
        "model": {"id": MODEL[0], "revision": MODEL[1]},
        "key": flip_key,
    }
    rdb.set(keys.verdict(flip_key), json.dumps(crafted), ex=600)

    Host.callbacks.clear()
    second = start(
        scan_client,
        [
            row("new", url("img35.jpg")),
            row("keep", url("img31.jpg")),
            row("flip", flip_url, "catalogue flip"),
            row("breaks", bad),
            row("heals", url("img36.jpg")),
            row(None, url("img37.jpg")),  # no id: not comparable
            row("dup", url("img34.jpg")),
            row("dup", bad),  # the second of an id: not compared
        ],
        catalogue=catalogue,
        callback_url=f"{host}/hook-catalogue",
    )
    two = wait_scan(scan_client, second["scan_id"])
    assert two["status"] == "succeeded" and two["baseline_scan"] == one["scan_id"]
    expected_counts = {
        "label_changed": 1,
        "newly_failed": 1,
        "recovered": 1,
        "added": 1,
        "removed": 1,
        "unmatched": 2,
    }
    assert two["changes"] == expected_counts
    got = [
        json.loads(line)
        for line in scan_client.get(f"/v1/scans/{two['scan_id']}/changes").text.splitlines()
    ]
    assert [(c["kind"], c["id"]) for c in got] == [
        ("added", "new"),
        ("label_changed", "flip"),
        ("newly_failed", "breaks"),
        ("recovered", "heals"),
        ("removed", "gone"),
    ]
    flip = got[1]
    assert (flip["old_label"], flip["new_label"]) == (was, now)
    assert flip["new_probabilities"] == probs
    for side in ("old", "new"):
        probs = flip[f"{side}_probabilities"]
        assert max(probs, key=probs.get) == flip[f"{side}_label"]
    assert got[2]["old_label"] and got[2]["new_error"] and got[3]["old_error"]
    csv_lines = scan_client.get(
        f"/v1/scans/{two['scan_id']}/changes", params={"format": "csv"}
    ).text.splitlines()
    assert csv_lines[0].startswith("kind,id,old_label") and len(csv_lines) == 6
    page = scan_client.get(f"/v1/scans/{two['scan_id']}/report", params={"format": "html"}).text
    assert f"Changes since <code>{one['scan_id']}</code>" in page
    assert "label changed" in page and ">flip<" in page and ">gone<" in page
    deadline = time.monotonic() + 30
    while not any(h.get("X-OFA-Scan") == two["scan_id"] for h, _ in Host.callbacks):
        assert time.monotonic() < deadline, "no callback for the catalogue scan"
        time.sleep(0.1)
    body = json.loads(next(b for h, b in Host.callbacks if h.get("X-OFA-Scan") == two["scan_id"]))
    assert body["changes"] == expected_counts and body["baseline_scan"] == one["scan_id"]
    assert body["catalogue"] == catalogue

    # The CLI as a schedule runs it: JSON on stdout, an exit code per outcome, and a
    # second run the same day (same key) answered with the same scan.
    manifest = Path(service_env.get("TMPDIR", "/tmp")) / f"{catalogue}.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (row("keep", url("img31.jpg")), row("breaks", bad), row("new", bad))
        )
    )

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "shared.cli", "scan", str(manifest), "--url", api,
             "--api-key", API_KEY, "--catalogue", catalogue, *extra],
            env=service_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    ran = cli("--idempotency-key", f"{catalogue}-{{date}}", "--json")
    assert ran.returncode == 4, ran.stderr  # succeeded, with rows failed
    summary = json.loads(ran.stdout)
    assert summary["status"] == "succeeded" and summary["exit_code"] == 4
    assert summary["baseline_scan"] == two["scan_id"]
    assert summary["changes"]["newly_failed"] == 1 and summary["changes"]["removed"] == 3
    again = cli("--idempotency-key", f"{catalogue}-{{date}}", "--json", "--no-wait")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["scan_id"] == summary["scan_id"]
    other = cli("--idempotency-key", f"{catalogue}-{{date}}", "--json", "--catalogue", "x")
    assert other.returncode == 1 and "409" in other.stderr and other.stdout == ""
    manifest.unlink()
