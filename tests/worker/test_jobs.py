"""``run_job`` called directly on the tiny checkpoint: every path a job can take in a
worker, without Celery in between."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared.errors import BadInputError
from shared.keys import payload_name, verdict_key
from shared.models import JobStatus
from shared.wire import EntailTask
from tests.conftest import INPROC_MODEL
from tests.helpers import batch_stats, settled
from worker.jobs import run_job
from worker.runtime import Runtime

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture(scope="module")
def rt(inproc_settings) -> Iterator[Runtime]:
    runtime = Runtime.start(inproc_settings)
    yield runtime
    runtime.stop()
    runtime.redis.close()


def queued(rt: Runtime, image: bytes, text: str, scan_id: str | None = None) -> EntailTask:
    """A job stored (record, blob, deadline) for the in-process model, and its message,
    as the API or a scan's coordinator would have sent it."""
    key = verdict_key(*INPROC_MODEL, image, text, None)
    job_id = rt.jobs.create_or_join(key, image, text, None, scan_id).job_id
    return EntailTask(
        job_id=job_id,
        key=key,
        model=INPROC_MODEL[0],
        revision=INPROC_MODEL[1],
        text=text,
        scan_id=scan_id,
    )


def settled_stats(rt: Runtime) -> dict[str, int]:
    """The batch statistics, settled (``tests.helpers.settled``)."""
    return settled(lambda: batch_stats(rt.settings), settle_s=0.2)


def test_scores_then_finishes_redelivery_from_the_cache(rt: Runtime):
    from tests.helpers import encode_image, photo

    image = encode_image(photo("chelsea").resize((64, 48)))
    msg = queued(rt, image, "a cat")
    items = settled_stats(rt).get("items", 0)
    verdict = run_job(rt, msg).verdict
    expected = rt.entailer.predict(image, "a cat")
    assert verdict is not None and verdict.label == expected.label
    assert verdict.probabilities.model_dump() == pytest.approx(expected.probabilities, abs=1e-6)
    assert (verdict.model.id, verdict.model.revision) == INPROC_MODEL and verdict.key == msg.key
    job = rt.reads.get(msg.job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and not job.cached
    assert settled_stats(rt)["items"] == items + 1
    # The same message again (a duplicate): the job is finished, nothing runs.
    assert run_job(rt, msg).verdict is None
    assert settled_stats(rt)["items"] == items + 1
    # A worker that died after caching the verdict but before finishing the record:
    # the redelivered message (its lease ran out) finishes from the cache, no model run.
    rdb = rt.redis.durable
    rdb.hset(rt.jobs.keys.job(msg.job_id), "status", "running")
    rdb.zadd(rt.jobs.keys.job_deadlines(), {msg.job_id: time.time() - 1})
    assert run_job(rt, msg).verdict == verdict
    assert rt.reads.get(msg.job_id).cached  # type: ignore[union-attr]
    assert settled_stats(rt)["items"] == items + 1


def test_an_image_the_model_cannot_read_fails_at_once(rt: Runtime):
    from tests.helpers import small_jpeg

    msg = queued(rt, small_jpeg(seed=6)[:300], "x")  # truncated
    assert run_job(rt, msg).verdict is None
    job = rt.reads.get(msg.job_id)
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error is not None and job.error.startswith("Unreadable image")


def test_a_missing_payload_fails_readably(rt: Runtime, rdb):
    """A record whose payload is gone (expired, swept) fails its job cleanly."""
    from tests.helpers import small_jpeg

    msg = queued(rt, small_jpeg(seed=7), "x")
    rt.jobs.payloads.delete(payload_name(msg.key, msg.job_id))
    assert run_job(rt, msg).verdict is None
    assert "expired" in (rt.reads.get(msg.job_id).error or "")  # type: ignore[union-attr]


def test_a_cancelled_scan_drops_its_jobs(rt: Runtime):
    from tests.helpers import small_jpeg

    rt.scans.create("s-cancel", 1, "/m", None)
    msg = queued(rt, small_jpeg(seed=8), "x", scan_id="s-cancel")
    rt.scans.durable.hset(rt.scans.keys.scan("s-cancel"), "status", "cancelled")
    assert run_job(rt, msg).verdict is None
    assert rt.reads.get(msg.job_id).error == "scan cancelled"  # type: ignore[union-attr]


def test_a_chunk_runs_its_items_together_each_with_its_own_outcome(rt: Runtime, monkeypatch):
    from tests.helpers import VERDICT, small_jpeg
    from worker.jobs import run_chunk

    # Earlier tests' interactive jobs would cut bulk batches to the time budget
    # (test_batcher.py checks that); here: a chunk's items are batched together.
    monkeypatch.setattr(rt.batcher, "bulk_budget_s", 0.0)

    fresh = [queued(rt, small_jpeg(seed=300 + i), f"chunk row {i}", "scan-c") for i in range(5)]
    done = queued(rt, small_jpeg(seed=310), "already done", "scan-c")
    rt.jobs.succeed(done.job_id, done.key, VERDICT, cached=False)
    cached = queued(rt, small_jpeg(seed=311), "cached meanwhile", "scan-c")
    rt.redis.cache.set(rt.jobs.keys.verdict(cached.key), VERDICT.model_dump_json())
    broken = queued(rt, b"\xff\xd8 not really a jpeg", "broken", "scan-c")
    stats = settled_stats(rt)
    counts = run_chunk(rt, [*fresh, done, cached, broken])
    assert counts == {"scored": 5, "cached": 1, "skipped": 2, "retried": 0}
    after = settled_stats(rt)
    assert after["items"] - stats.get("items", 0) == 5
    assert after["batches"] - stats.get("batches", 0) <= 2  # scored together, not one by one
    for msg in fresh:
        job = rt.reads.get(msg.job_id)
        assert job is not None and job.status == JobStatus.SUCCEEDED and job.verdict is not None
    cached_job = rt.reads.get(cached.job_id)
    assert cached_job is not None and cached_job.cached
    failed = rt.reads.get(broken.job_id)
    assert failed is not None and failed.status == JobStatus.FAILED and failed.error


def test_preprocessing_processes_give_the_same_verdicts(rt: Runtime, inproc_settings):
    """Images decoded and resized by a pool of processes: the same pixels, the same
    verdicts as in the worker's own threads; bad images still fail their job alone."""
    from tests.helpers import encode_image, photo, small_jpeg
    from worker.jobs import run_chunk

    pooled = Runtime.start(inproc_settings.model_copy(update={"preprocess_processes": 2}))
    try:
        assert pooled.pool is not None
        image = encode_image(photo("coffee").resize((200, 150)))
        (decoding,) = pooled.decode_many([image])
        assert not isinstance(decoding, bytes)
        ours = pooled.entailer.prepare_resized(decoding.result(), "a cup")
        theirs = rt.entailer.prepare(image, "a cup")
        assert (ours.pixels == theirs.pixels).all() and ours.source == theirs.source
        # A chunk's images: one call per pool process, a future per image.
        many = pooled.decode_many([image, b"GIF89a not an image", small_jpeg(seed=9), image])
        assert all(not isinstance(f, bytes) for f in many)
        assert (many[0].result() == theirs.pixels).all()
        assert (many[3].result() == theirs.pixels).all()
        with pytest.raises(BadInputError):
            many[1].result()
        alone = rt.entailer.prepare(small_jpeg(seed=9), "x").pixels
        assert (many[2].result() == alone).all()
        single = queued(pooled, image, "pooled single")
        verdict = run_job(pooled, single).verdict
        expected = rt.entailer.predict(image, "pooled single")
        assert verdict is not None
        assert verdict.probabilities.model_dump() == pytest.approx(expected.probabilities, abs=1e-6)
        chunk = [queued(pooled, small_jpeg(seed=400 + i), f"row {i}", "scan-p") for i in range(4)]
        broken = queued(pooled, b"GIF89a not an image", "pooled broken", "scan-p")
        counts = run_chunk(pooled, [*chunk, broken])
        assert counts == {"scored": 4, "cached": 0, "skipped": 1, "retried": 0}
        failed = pooled.reads.get(broken.job_id)
        assert failed is not None and failed.status == JobStatus.FAILED
    finally:
        pooled.stop()
        pooled.redis.close()


def test_a_blob_that_does_not_hash_to_its_key_is_never_scored(rt: Runtime):
    """A job whose stored image is not the one its key names (another image written
    under the key, or a message whose text is not the key's): failed for good with a
    readable error, no model run, nothing cached under the key; the chunk's other
    items are scored as usual."""
    from tests.helpers import small_jpeg
    from worker.jobs import KEY_MISMATCH, run_chunk

    image, other = small_jpeg(seed=41), small_jpeg(seed=42)
    key = verdict_key(*INPROC_MODEL, image, "a red cup", None)
    # The blob written under the key is another image's (what a URL that changed
    # between revalidation and fetch used to leave).
    swapped_id = rt.jobs.create_or_join(key, other, "a red cup", None, "scan-k").job_id
    swapped = EntailTask(
        job_id=swapped_id,
        key=key,
        model=INPROC_MODEL[0],
        revision=INPROC_MODEL[1],
        text="a red cup",
        scan_id="scan-k",
    )
    # The right image, but a message whose text is not the one the key was made of.
    honest = queued(rt, small_jpeg(seed=43), "a blue cup", "scan-k")
    retexted = honest.model_copy(update={"text": "a green cup"})
    fine = queued(rt, small_jpeg(seed=44), "a plain cup", "scan-k")
    items = settled_stats(rt).get("items", 0)
    counts = run_chunk(rt, [swapped, retexted, fine])
    assert counts == {"scored": 1, "cached": 0, "skipped": 2, "retried": 0}
    assert settled_stats(rt)["items"] == items + 1  # only "fine" reached the model
    for msg in (swapped, retexted):
        job = rt.reads.get(msg.job_id)
        assert job is not None and job.status == JobStatus.FAILED
        assert job.error == KEY_MISMATCH
        assert rt.reads.cached_many([msg.key]) == {}
        assert rt.jobs.payloads.get(payload_name(msg.key, msg.job_id)) is None
    # Alone (an interactive job, or one the reaper sent again): the same refusal.
    again_key = verdict_key(*INPROC_MODEL, image, "a tall cup", None)
    again_id = rt.jobs.create_or_join(again_key, other, "a tall cup", None).job_id
    alone = swapped.model_copy(update={"job_id": again_id, "key": again_key, "text": "a tall cup"})
    assert run_job(rt, alone).verdict is None
    job = rt.reads.get(again_id)
    assert job is not None and job.error == KEY_MISMATCH
    assert rt.reads.cached_many([again_key]) == {}


def test_an_unreachable_payload_store_puts_the_job_back_and_a_later_attempt_scores_it(
    rt: Runtime, tmp_path, monkeypatch
):
    """The payload store briefly unreachable: the job goes back to queued (nothing
    failed, nothing lost), and the next attempt, with the store back, scores it."""
    from shared.payloads import LocalPayloads
    from tests.helpers import small_jpeg

    msg = queued(rt, small_jpeg(seed=8), "a cup")
    (tmp_path / "not-a-folder").write_bytes(b"")
    monkeypatch.setattr(rt.jobs, "payloads", LocalPayloads(tmp_path / "not-a-folder" / "p"))
    # An outage longer than the job's tries: waiting on the store uses none of them.
    for _ in range(rt.settings.max_attempts + 2):
        assert run_job(rt, msg).kind == "retried"
        job = rt.reads.get(msg.job_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.error is None
    record = rt.jobs.record(msg.job_id)
    assert int(record["store_waits"]) == rt.settings.max_attempts + 2
    monkeypatch.undo()
    assert run_job(rt, msg).verdict is not None
    assert rt.reads.get(msg.job_id).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert rt.jobs.payloads.get(payload_name(msg.key, msg.job_id)) is None  # removed at the end
