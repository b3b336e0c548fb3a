"""The coordinator called directly: a manifest through resolution, the cache, the bulk
queue and the results file, with the real ``run_job`` draining the queue in between."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import wiring
from shared.celery_app import make_celery
from shared.keys import verdict_key
from shared.models import RowState, ScanStatus
from shared.scans.folder import ScanFolder
from shared.scans.manifest import Row
from shared.scans.results import ResultsDB, RowResult, result_line
from shared.wire import EntailChunk, EntailTask, queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import VERDICT, broker_messages, small_jpeg
from worker.jobs import run_chunk, run_job
from worker.runtime import Runtime
from worker.scans.coordinator import Coordinator, remove_expired_scans
from worker.scans.resolver import RowResolver

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture(scope="module")
def rt(inproc_settings) -> Iterator[Runtime]:
    runtime = Runtime.start(inproc_settings)
    yield runtime
    runtime.stop()
    runtime.redis.close()


@pytest.fixture
def coord(inproc_settings, jobs, scans, inproc_redis) -> Coordinator:
    resolver = RowResolver(
        inproc_settings, jobs.keys, inproc_redis.cache, wiring.url_policy(inproc_settings)
    )
    stores = wiring.stores(inproc_settings, sync=inproc_redis)
    return Coordinator(inproc_settings, stores, resolver, make_celery(inproc_settings))


def b64(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def drain_bulk_queue(rt: Runtime, rdb, messages_seen: list[int] | None = None) -> int:
    """What a worker would do with the bulk messages (chunks of a scan's jobs, or one
    job the reaper re-sent): run each job. Returns the number of jobs."""
    queue = queue_name(*INPROC_MODEL, bulk=True)
    messages = broker_messages(rdb, queue)
    rdb.delete(queue)
    if messages_seen is not None:
        messages_seen.append(len(messages))
    jobs = 0
    for message in messages:
        body = message["kwargs"]["msg"]
        if "items" in body:
            chunk = EntailChunk.model_validate(body)
            counts = run_chunk(rt, chunk.items)
            assert counts["retried"] == 0, counts
            jobs += len(chunk.items)
        else:
            run_job(rt, EntailTask.model_validate(body))
            jobs += 1
    return jobs


def test_a_scan_end_to_end_in_process(coord, rt, jobs, scans, rdb, inproc_settings):
    miss, hit, on_disk = small_jpeg(seed=201), small_jpeg(seed=202), small_jpeg(seed=203)
    assert inproc_settings.image_root is not None
    (inproc_settings.image_root / "disk.jpg").write_bytes(on_disk)
    key = verdict_key(*INPROC_MODEL, hit, "cached row", None)
    job_id = jobs.create_or_join(key, hit, "cached row", None).job_id
    jobs.succeed(job_id, key, VERDICT, cached=False)
    rows = [
        {"id": "miss", "image": b64(miss), "text": "a thing"},
        {"id": "dup", "image_base64": b64(miss), "text": "A  thing"},
        {"id": "hit", "image": b64(hit), "text": "cached row"},
        {"id": "disk", "image": "disk.jpg", "text": "from disk"},
        {"id": "notext", "image": b64(miss)},
        {"id": "escape", "image": "../etc/passwd", "text": "x"},
    ]
    folder = ScanFolder(inproc_settings.scans_path, "scan-inproc")
    folder.create()
    deep = '{"id": "deep", "text": "x", "image": ' + "[" * 5000 + "]" * 5000 + "}\n"
    folder.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n" + deep)
    scans.create(folder.scan_id, len(rows) + 2, str(folder.manifest), None)

    assert coord.run(folder.scan_id) == "more"  # two distinct misses wait for a worker
    sent: list[int] = []
    assert drain_bulk_queue(rt, rdb, sent) == 2  # "miss" and "dup" share one job
    assert sent == [1]  # both in one chunk message
    assert coord.run(folder.scan_id) == "done"

    summary = scans.summary(folder.scan_id)
    assert summary is not None and summary.status == ScanStatus.SUCCEEDED
    assert (summary.total, summary.done, summary.cached, summary.failed) == (8, 4, 1, 4)
    db = ResultsDB(folder.results, readonly=True)
    try:
        out = {
            doc["id"] or f"row{i}": doc for i, doc in enumerate(map(result_line, db.iter_results()))
        }
    finally:
        db.close()
    assert out["miss"]["label"] and out["miss"]["probabilities"] == out["dup"]["probabilities"]
    assert out["hit"]["cached"] and out["hit"]["label"] == VERDICT.label
    assert out["disk"]["label"] and not out["disk"]["cached"]
    assert "missing text" in out["notext"]["error"]
    assert "outside the image root" in out["escape"]["error"]
    assert "not a JSON object" in out["row6"]["error"]
    assert "nested too deeply" in out["row7"]["error"]  # that row's error; the scan went on
    expected = rt.entailer.predict(miss, "a thing")
    assert out["miss"]["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)


def test_a_scan_held_elsewhere_is_busy(coord, scans):
    scans.create("held", 1, "/nowhere", None)
    token = scans.lock("held", 30)
    assert token is not None
    assert coord.run("held") == "busy"
    scans.unlock("held", token)


def test_expired_scan_folders_are_removed(tmp_path: Path, scans, inproc_settings):
    settings = inproc_settings.model_copy(update={"scan_dir": tmp_path})
    old, live, young = (tmp_path / n for n in ("old-scan", "live-scan", "young-scan"))
    for folder in (old, live, young):
        folder.mkdir()
        (folder / "results.db").write_bytes(b"x")
    long_ago = time.time() - 7200
    for folder in (old, live):
        os.utime(folder, (long_ago, long_ago))
    scans.create("live-scan", 1, "/m", None)
    assert remove_expired_scans(settings, scans) == ["old-scan"]
    assert not old.exists() and live.exists() and young.exists()


def test_rows_with_sha256_touch_their_file_only_when_a_job_needs_it(
    coord, rt, jobs, scans, rdb, inproc_settings
):
    import hashlib

    assert inproc_settings.image_root is not None
    cached, on_disk = small_jpeg(seed=211), small_jpeg(seed=212)
    (inproc_settings.image_root / "sha.jpg").write_bytes(on_disk)
    key = verdict_key(*INPROC_MODEL, cached, "cached by digest", None)
    done = jobs.create_or_join(key, cached, "cached by digest", None).job_id
    jobs.succeed(done, key, VERDICT, cached=False)

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    rows = [
        # No such file: never opened, the digest finds the verdict.
        {"id": "gone", "image": "no-such.jpg", "text": "cached by digest", "sha256": sha(cached)},
        {"id": "right", "image": "sha.jpg", "text": "read when needed", "sha256": sha(on_disk)},
        {"id": "wrong", "image": "sha.jpg", "text": "another text", "sha256": sha(cached)},
    ]
    folder = ScanFolder(inproc_settings.scans_path, "scan-sha")
    folder.create()
    folder.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scans.create(folder.scan_id, len(rows), str(folder.manifest), None)
    assert coord.run(folder.scan_id) == "more"
    assert drain_bulk_queue(rt, rdb) == 1
    assert coord.run(folder.scan_id) == "done"
    db = ResultsDB(folder.results, readonly=True)
    try:
        out = {doc["id"]: doc for doc in map(result_line, db.iter_results())}
    finally:
        db.close()
    assert out["gone"]["cached"] and out["gone"]["label"] == VERDICT.label
    assert out["right"]["label"] and not out["right"]["cached"]
    assert "does not match the row's sha256" in out["wrong"]["error"]


def test_announcements_name_finished_jobs_and_ask_for_full_rereads(jobs, reads, monkeypatch):
    """A slice re-reads the jobs announced finished, and every pending row at least
    every FULL_SWEEP_S; a broken subscription turns it into full re-reads only."""
    from worker.scans import coordinator as c

    heard = c.Announcements(reads.done)
    try:
        assert heard.take() is None  # the first turn: everything
        jobs.sync.durable.publish(jobs.keys.done_channel(), "j1")  # a cancellation
        jobs.sync.durable.publish(jobs.keys.done_channel(), 'j2 ["status","succeeded"]')
        got: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while got.keys() != {"j1", "j2"}:
            assert time.monotonic() < deadline
            more = heard.take(0.05)
            assert more is not None
            got |= more
        assert got == {"j1": "", "j2": '["status","succeeded"]'}  # with what came after
        monkeypatch.setattr(c, "FULL_SWEEP_S", 0.0)
        assert heard.take() is None
    finally:
        heard.close()
    assert heard.take() is None  # closed: full re-reads only


def test_rows_are_collected_from_announced_records_without_reading_them(
    coord, jobs, reads, tmp_path, monkeypatch
):
    """A finish's announcement carries the job's final record, which the coordinator
    copies as is; a job announced by id alone (a cancellation) is read."""
    from worker.scans import coordinator as c

    keys = [verdict_key(*INPROC_MODEL, small_jpeg(seed=s), "t", None) for s in (301, 302)]
    made = jobs.create_or_join_many([(k, small_jpeg(seed=1), "t", None) for k in keys], "s-ann")
    ids = [m.job_id for m in made]
    db = ResultsDB(tmp_path / "results.db")
    heard = c.Announcements(reads.done)
    try:
        db.record(
            [
                RowResult(i, f"r{i}", RowState.PENDING, key=k, job_id=j)
                for i, (k, j) in enumerate(zip(keys, ids, strict=True))
            ],
            2,
            0,
        )
        for job_id, key in zip(ids, keys, strict=True):
            jobs.succeed(job_id, key, VERDICT, cached=False)
        got: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while got.keys() != set(ids):
            assert time.monotonic() < deadline
            got |= heard.take(0.05) or {}
        assert all(got[j] for j in ids)  # both announced with their record
        # The first job's record is gone by the time the slice collects: what its
        # announcement carried is enough. The second is announced by id alone: read.
        jobs.sync.durable.delete(jobs.keys.job(ids[0]))
        read: list[list[str]] = []
        real = coord.reads.outcomes
        monkeypatch.setattr(coord.reads, "outcomes", lambda j: read.append(list(j)) or real(j))
        coord._collect(db, "s-ann", {ids[0]: got[ids[0]], ids[1]: ""})
        assert read == [[ids[1]]]
        rows = {doc["id"]: doc for doc in map(result_line, db.iter_results())}
        for name in ("r0", "r1"):
            assert rows[name]["label"] == VERDICT.label and rows[name]["error"] is None
    finally:
        heard.close()
        db.close()


def test_an_image_file_over_the_upload_limit_fails_its_row(inproc_settings, jobs, inproc_redis):
    assert inproc_settings.image_root is not None
    image = small_jpeg(seed=230)
    (inproc_settings.image_root / "limit.jpg").write_bytes(image)
    for limit, fails in ((len(image), False), (len(image) - 1, True)):
        settings = inproc_settings.model_copy(update={"max_upload_bytes": limit})
        resolver = RowResolver(settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings))
        got = resolver.read(Row(0, "r", {"id": "r", "image": "limit.jpg", "text": "a cup"}))
        if fails:
            assert got.error == f"image is larger than {limit} bytes" and got.key is None
        else:
            assert got.error is None and got.key is not None


def test_with_a_per_key_cache_a_scan_keys_its_rows_in_its_owners_cache(
    jobs, scans, rt, rdb, inproc_settings, inproc_redis
):
    """OFA_CACHE_SCOPE=key: a row whose verdict another key has cached is computed again
    for this scan's owner, and its job carries the owner as its tenant (the worker checks
    the bytes it scores against that key)."""
    settings = inproc_settings.model_copy(update={"cache_scope": "key"})
    resolver = RowResolver(settings, jobs.keys, inproc_redis.cache, wiring.url_policy(settings))
    stores = wiring.stores(settings, sync=inproc_redis)
    coord = Coordinator(settings, stores, resolver, make_celery(settings))
    image = small_jpeg(seed=231)
    theirs = verdict_key(*INPROC_MODEL, image, "a shared row", None, tenant="team-a")
    done = jobs.create_or_join(theirs, image, "a shared row", None).job_id
    jobs.succeed(done, theirs, VERDICT, cached=False)
    folder = ScanFolder(settings.scans_path, "scan-tenant")
    folder.create()
    folder.manifest.write_text(json.dumps({"id": "r", "image": b64(image), "text": "a shared row"}))
    scans.create(folder.scan_id, 1, str(folder.manifest), None, owner="team-b")
    assert coord.run(folder.scan_id) == "more"  # team-a's verdict is not team-b's
    [message] = broker_messages(rdb, queue_name(*INPROC_MODEL, bulk=True))
    [item] = EntailChunk.model_validate(message["kwargs"]["msg"]).items
    assert item.tenant == "team-b"
    assert item.key == verdict_key(*INPROC_MODEL, image, "a shared row", None, tenant="team-b")
    assert drain_bulk_queue(rt, rdb) == 1
    assert coord.run(folder.scan_id) == "done"
    assert stores.reads.cached_many([item.key])  # scored and cached in team-b's cache
