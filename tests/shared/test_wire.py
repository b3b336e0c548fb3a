"""The wire format's contract: the messages the API and the coordinator build by hand
(``shared/wire.py``) are byte for byte what Celery's ``send_task`` writes, on the
kombu and Celery releases pinned in pyproject.toml."""

from __future__ import annotations

import base64
import json

import pytest

from shared.submit import send_job
from shared.wire import (
    TASK_ENTAIL_CHUNK,
    EntailChunk,
    EntailTask,
    chunk_message,
    chunk_summary,
    entail_message,
    queue_name,
)
from tests.conftest import INPROC_MODEL

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def celery(inproc_settings):
    from shared.celery_app import make_celery

    return make_celery(inproc_settings)


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
