"""Submitting jobs and scans: a job's record and message stored together, a scan's
record before its message; nothing left behind when the broker refuses."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest

from shared.celery_app import queue_name
from shared.errors import ManifestError, PayloadTooLargeError, QueueUnavailableError
from shared.models import EntailTask, JobStatus, ScanStatus
from shared.submit import (
    BulkItem,
    asubmit_job,
    entail_message,
    send_job,
    submit_bulk,
    submit_job,
    submit_scan,
)
from tests.conftest import INPROC_MODEL
from tests.helpers import broker_messages, free_port

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def celery(inproc_settings):
    from shared.celery_app import make_celery

    return make_celery(inproc_settings)


@pytest.fixture
def ajobs(inproc_settings, inproc_redis):
    """The job store with asyncio clients too (the API's side); a test's event loop
    must close them (``aio.aclose``)."""
    from shared import wiring
    from shared.store import JobStore

    return JobStore(
        inproc_settings,
        wiring.keys(inproc_settings),
        inproc_redis,
        wiring.async_redis(inproc_settings),
    )


@pytest.fixture
def dead_celery(inproc_settings):
    from shared.celery_app import make_celery

    dead = inproc_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    return make_celery(dead)


def test_a_job_is_recorded_then_sent_as_a_typed_message(jobs, celery, rdb):
    job_id, created = submit_job(jobs, celery, "key-a", b"img", "a cat", "a photo")
    assert created
    assert jobs.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
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
    assert submit_job(jobs, celery, "key-a", b"img", "a cat", "a photo") == (job_id, False)
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


def readable(raw: bytes) -> dict:
    """A message as kombu's Redis transport stores it, its body decoded, without the
    ids kombu draws anew for every message (delivery tag, reply-to)."""
    envelope = json.loads(raw)
    envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    del envelope["properties"]["delivery_tag"], envelope["properties"]["reply_to"]
    return envelope


def test_the_api_builds_the_message_send_task_would_write(jobs, celery, rdb):
    """The API pushes ``ofa.entail`` messages itself (with the job's record, atomically):
    byte for byte what Celery's send_task writes, but for the ids kombu draws anew
    (delivery tag, reply-to) and the repr Flower shows."""
    msg = EntailTask(
        job_id="f" * 32,
        key="k" * 64,
        model=INPROC_MODEL[0],
        revision=INPROC_MODEL[1],
        text="a cat",
        premise="a photo",
        scan_id=None,
    )
    send_job(celery, msg)
    queue, ours = entail_message(celery, msg)
    assert queue == queue_name(*INPROC_MODEL)
    [theirs] = [readable(raw) for raw in rdb.lrange(queue, 0, -1)]
    mine = readable(ours)
    for envelope in (theirs, mine):
        del envelope["headers"]["kwargsrepr"]
    assert mine == theirs


def test_a_chunk_message_is_the_one_send_task_would_write(jobs, celery, rdb):
    """Scan chunks are pushed as the coordinator builds them (``chunk_message``): what
    Celery's send_task writes for the same task, but for the ids drawn anew (task id,
    delivery tag, reply-to); the repr Flower shows is the chunk's summary in both."""
    from shared.celery_app import TASK_ENTAIL_CHUNK
    from shared.models import EntailChunk
    from shared.submit import chunk_message, chunk_summary

    msgs = [
        EntailTask(
            job_id=f"{i:032x}",
            key="k" * 64,
            model=INPROC_MODEL[0],
            revision=INPROC_MODEL[1],
            text=f"row {i}",
            premise=None,
            scan_id="s1",
        )
        for i in range(3)
    ]
    queue, ours = chunk_message(celery, msgs)
    chunk = EntailChunk(model=INPROC_MODEL[0], revision=INPROC_MODEL[1], items=msgs)
    celery.send_task(
        TASK_ENTAIL_CHUNK,
        kwargs={"msg": chunk.model_dump()},
        queue=queue,
        retry=False,
        ignore_result=True,
        argsrepr="()",
        kwargsrepr=chunk_summary(chunk),
    )
    assert queue == queue_name(*INPROC_MODEL, bulk=True)
    [theirs] = [readable(raw) for raw in rdb.lrange(queue, 0, -1)]
    mine = readable(ours)
    for envelope in (theirs, mine):
        for drawn in ("id", "root_id"):
            del envelope["headers"][drawn]
        del envelope["properties"]["correlation_id"]
    # send_task also copies the reprs, given as options, into the properties; only the
    # headers' are read (the worker's task-received event, so Flower).
    assert theirs["properties"].pop("argsrepr") == mine["headers"]["argsrepr"]
    assert theirs["properties"].pop("kwargsrepr") == mine["headers"]["kwargsrepr"]
    assert mine == theirs


def test_an_interactive_job_is_recorded_and_queued_in_one_step(ajobs, celery, rdb):
    async def main():
        try:
            first = await asubmit_job(ajobs, celery, "key-z", b"img", "a dog", None)
            again = await asubmit_job(ajobs, celery, "key-z", b"img", "a dog", None)
        finally:
            await ajobs.aio.aclose()
        return first, again

    (job_id, created), again = asyncio.run(main())
    assert created and again == (job_id, False)
    assert ajobs.get(job_id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    [message] = broker_messages(rdb, queue_name(*INPROC_MODEL))  # one message for both
    assert message["headers"]["id"] == job_id and message["headers"]["task"] == "ofa.entail"
    msg = EntailTask.model_validate(message["kwargs"]["msg"])
    assert (msg.job_id, msg.key, msg.text, msg.premise) == (job_id, "key-z", "a dog", None)
