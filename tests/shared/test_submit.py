"""Submitting jobs and scans: a job's record and message stored together, a scan's
record before its message; nothing left behind when the broker refuses."""

from __future__ import annotations

import asyncio
import io

import pytest

from shared.errors import ManifestError, PayloadTooLargeError, QueueUnavailableError
from shared.models import JobStatus, ScanStatus
from shared.submit import BulkItem, asubmit_job, submit_bulk, submit_scan
from shared.wire import EntailTask, queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import broker_messages, free_port, submit_job

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def celery(inproc_settings):
    from shared.celery_app import make_celery

    return make_celery(inproc_settings)


@pytest.fixture
def ajobs(inproc_settings, inproc_redis):
    """The stores with asyncio clients too (the API's side); a test's event loop must
    close them (``aio.aclose``)."""
    from shared import wiring

    return wiring.stores(
        inproc_settings, sync=inproc_redis, aio=wiring.async_redis(inproc_settings)
    )


@pytest.fixture
def dead_celery(inproc_settings):
    from shared.celery_app import make_celery

    dead = inproc_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    return make_celery(dead)


def test_a_job_is_recorded_then_sent_as_a_typed_message(reads, celery, rdb, inproc_settings):
    job_id, created = submit_job(inproc_settings, celery, "key-a", b"img", "a cat", "a photo")
    assert created
    assert reads.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [message] = broker_messages(rdb, queue_name(*INPROC_MODEL))
    assert message["headers"]["id"] == job_id and message["headers"]["task"] == "ofa.entail"
    msg = EntailTask.model_validate(message["kwargs"]["msg"])
    assert (msg.job_id, msg.key, msg.text, msg.premise, msg.scan_id) == (
        job_id,
        "key-a",
        "a cat",
        "a photo",
        None,
    )
    # The same key joins: no second record, no second message.
    again = submit_job(inproc_settings, celery, "key-a", b"img", "a cat", "a photo")
    assert again == (job_id, False)
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 1


def test_scan_jobs_go_to_the_bulk_queue(jobs, celery, rdb):
    submit_bulk(jobs, celery, "s1", [BulkItem("key-b", b"img", "t", None)], chunk=32)
    assert rdb.llen(queue_name(*INPROC_MODEL, bulk=True)) == 1
    assert rdb.llen(queue_name(*INPROC_MODEL)) == 0


def test_a_chunk_message_names_its_scan_and_jobs_for_flower(jobs, celery, rdb):
    items = [BulkItem(f"key-{i}", b"img", f"t{i}", None) for i in range(6)]
    ids = submit_bulk(jobs, celery, "s1", items, chunk=32)
    (message,) = broker_messages(rdb, queue_name(*INPROC_MODEL, bulk=True))
    assert [m["job_id"] for m in message["kwargs"]["msg"]["items"]] == ids
    shown = message["headers"]["kwargsrepr"]
    assert shown.startswith("{'msg': '6 jobs of scan s1: ")
    assert all(i in shown for i in ids[:4]) and ids[-1] in shown and ids[4] not in shown
    assert message["headers"]["argsrepr"] == "()"


@pytest.mark.slow
def test_scan_broker_down_leaves_nothing(scans, dead_celery, rdb, inproc_settings):
    manifest = io.BytesIO(b'{"id": "1", "image": "a.jpg", "text": "t"}\n')
    folders = set(inproc_settings.scans_path.glob("*"))
    with pytest.raises(QueueUnavailableError):
        submit_scan(scans, dead_celery, inproc_settings, "jsonl", None, upload=manifest)
    assert list(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == []
    assert set(inproc_settings.scans_path.glob("*")) == folders


def test_scan_is_stored_counted_and_queued(scans, celery, rdb, inproc_settings):
    csv = io.BytesIO(b"id,image,text\n1,a.jpg,one\n2,b.jpg,two\n")
    scan_id, total = submit_scan(scans, celery, inproc_settings, "csv", None, upload=csv)
    assert total == 2
    summary = scans.summary(scan_id)
    assert summary is not None and summary.status == ScanStatus.QUEUED and summary.total == 2
    scans.discard(scan_id)


@pytest.mark.parametrize(
    ("body", "fmt", "error"),
    [
        (b"", "jsonl", ManifestError),
        (b"not json\n", "jsonl", ManifestError),
        (b"[1, 2]\n", "jsonl", ManifestError),
        (b"id,image\n1,a.jpg\n", "csv", ManifestError),
        (b'{"id": "1", "text": "' + b"x" * 70_000 + b'"}\n', "jsonl", PayloadTooLargeError),
    ],
)
def test_bad_manifests_store_nothing(body, fmt, error, scans, celery, rdb, inproc_settings):
    folders = set(inproc_settings.scans_path.glob("*"))
    with pytest.raises(error):
        submit_scan(scans, celery, inproc_settings, fmt, None, upload=io.BytesIO(body))
    assert list(rdb.scan_iter(f"{inproc_settings.key_prefix}*")) == []
    assert set(inproc_settings.scans_path.glob("*")) == folders


def test_an_interactive_job_is_recorded_and_queued_in_one_step(ajobs, celery, rdb):
    async def main():
        try:
            first = await asubmit_job(ajobs.jobs, celery, "key-z", b"img", "a dog", None)
            again = await asubmit_job(ajobs.jobs, celery, "key-z", b"img", "a dog", None)
        finally:
            await ajobs.jobs.aio.aclose()
        return first, again

    (job_id, created), again = asyncio.run(main())
    assert created and again == (job_id, False)
    assert ajobs.reads.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [message] = broker_messages(rdb, queue_name(*INPROC_MODEL))  # one message for both
    assert message["headers"]["id"] == job_id and message["headers"]["task"] == "ofa.entail"
    msg = EntailTask.model_validate(message["kwargs"]["msg"])
    assert (msg.job_id, msg.key, msg.text, msg.premise) == (job_id, "key-z", "a dog", None)
