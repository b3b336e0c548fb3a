"""One trace per job (``shared/tracing.py``, ``worker/tracing.py``): the API's span, the
worker's job, queue, preparation and batch spans and the webhook delivery's span in one
trace, read from the SDK's in-memory exporter. The three parts run in this process as
their processes run them (the ASGI app, ``run_job`` on the tiny checkpoint with the
message the API pushed, the delivery of the webhook message the worker queued, to a
real HTTP server), on a database of the session's Valkey no other process listens on."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import redis
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from api.app import create_app
from shared import tracing, wiring
from shared.celery_app import make_celery
from shared.models import JobStatus
from shared.store import WebhookSlots
from shared.submit import message_of, send_job
from shared.wire import WEBHOOK_QUEUE, EntailTask, entail_message, queue_name
from tests.conftest import INPROC_MODEL
from tests.helpers import API_KEY, broker_messages, small_jpeg
from tests.shared.test_wire import readable
from worker.jobs import run_job, run_many
from worker.runtime import Runtime
from worker.scans.webhooks import Webhooks, run_traced

DB = 9  # a database of the session's Valkey of this module's own
PREFIX = "ofa:tracing:"


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that keeps the headers of every POST."""

    got: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Receiver.got.append(dict(self.headers))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def settings(inproc_settings, valkey: str):
    return inproc_settings.model_copy(
        update={
            "redis_url": valkey.rsplit("/", 1)[0] + f"/{DB}",
            "key_prefix": PREFIX,
            "opentelemetry": True,
            "webhook_secret": SecretStr("tracing-test-secret"),
            "url_allow_hosts": ["127.0.0.1"],
            "durable_ack": "off",
        }
    )


@pytest.fixture(scope="module")
def db(settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def spans(settings, db) -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span kept in memory; off again after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(settings, "test", provider=provider)
    yield exporter
    tracing.forget()
    provider.shutdown()


@pytest.fixture(scope="module")
def rt(settings, db) -> Iterator[Runtime]:
    runtime = Runtime.start(settings)
    yield runtime
    runtime.stop()
    runtime.redis.close()


@pytest.fixture
def api(settings, spans) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def taken(db: redis.Redis, queue: str) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """The oldest message on ``queue``, taken off it: headers, args, kwargs."""
    raw = db.rpop(queue)
    assert raw is not None, f"nothing on {queue}"
    db.lpush(queue, raw)
    message = broker_messages(db, queue)[-1]
    db.rpop(queue)
    return message["headers"], message["args"], message["kwargs"]


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_one_job_is_one_trace_from_the_api_to_the_webhook(api, rt, db, settings, spans, receiver):
    image = small_jpeg(seed=71)
    form = {"text": "a red square", "callback_url": receiver}
    resp = api.post("/v1/jobs", data=form, files={"image": ("a.jpg", image)})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]

    # The worker: the message the API pushed, run as a worker's thread runs it.
    headers, _, kwargs = taken(db, queue_name(*INPROC_MODEL))
    assert headers[tracing.TRACEPARENT] and float(headers[tracing.SENT_AT]) > 0
    outcome = run_job(rt, EntailTask.model_validate(kwargs["msg"]), headers)
    assert outcome.kind == "scored"
    job = rt.reads.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED

    # The coordinator: the webhook message the worker queued, delivered.
    hook_headers, args, hook_kwargs = taken(db, WEBHOOK_QUEUE)
    stores = wiring.stores(settings, sync=rt.redis)
    slots = WebhookSlots(settings, rt.jobs.keys, stores.clients, bound=4, hold_s=10)
    hooks = Webhooks(settings, stores.reads, stores.scans, slots)
    delivered = run_traced(hooks, hook_headers["task"], args, hook_kwargs, 0, hook_headers)
    assert delivered.kind == "delivered", delivered

    got = by_name(spans)
    names = {"ofa.submit", "ofa.job", "ofa.queue", "ofa.prepare", "ofa.batch", "ofa.webhook"}
    assert names <= set(got), sorted(got)
    # FastAPI's own request span is the root; every span shares its trace.
    [root] = [s for s in spans.get_finished_spans() if s.parent is None]
    assert root.attributes.get("http.route") == "/v1/jobs" or "/v1/jobs" in root.name
    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {trace_id}
    # The chain: submit -> job -> (queue, prepare, batch), job -> webhook.
    submit, job_span = got["ofa.submit"], got["ofa.job"]
    assert submit.attributes["ofa.job.id"] == job_id and submit.attributes["ofa.job.created"]
    assert job_span.parent.span_id == submit.context.span_id
    assert job_span.attributes["ofa.job.outcome"] == "scored"
    for child in ("ofa.queue", "ofa.prepare", "ofa.batch"):
        assert got[child].parent.span_id == job_span.context.span_id, child
    # Queue wait, preparation and the batch follow each other inside the job's span.
    queue, prepare, batch = got["ofa.queue"], got["ofa.prepare"], got["ofa.batch"]
    assert job_span.start_time == queue.start_time <= queue.end_time == prepare.start_time
    assert prepare.end_time <= batch.start_time < batch.end_time <= job_span.end_time
    assert batch.attributes["ofa.batch.size"] == 1 and batch.attributes["ofa.batch.ok"]
    webhook = got["ofa.webhook"]
    assert webhook.parent.span_id == job_span.context.span_id
    assert webhook.attributes["ofa.webhook.outcome"] == "delivered"
    # The receiver got the delivery span's context: it can continue the trace.
    sent = Receiver.got[-1]["traceparent"].split("-")
    assert (int(sent[1], 16), int(sent[2], 16)) == (trace_id, webhook.context.span_id)


def test_jobs_of_many_traces_in_one_batch_each_get_its_span(api, rt, db, spans):
    """A batch serves jobs of many traces: each job's trace gets a span of the batch it
    rode in, all naming the same batch, none of them in another job's trace."""
    for seed in (74, 75, 76):
        files = {"image": ("a.jpg", small_jpeg(seed))}
        assert api.post("/v1/jobs", data={"text": "a dog"}, files=files).status_code == 202
    messages = [taken(db, queue_name(*INPROC_MODEL)) for _ in range(3)]
    msgs = [EntailTask.model_validate(kwargs["msg"]) for _, _, kwargs in messages]
    outcomes = run_many(rt, msgs, 0, [headers for headers, _, _ in messages])
    assert [o.kind for o in outcomes] == ["scored"] * 3
    finished = spans.get_finished_spans()
    jobs = {s.context.span_id: s for s in finished if s.name == "ofa.job"}
    batches = [s for s in finished if s.name == "ofa.batch"]
    assert len(jobs) == 3 and len({j.context.trace_id for j in jobs.values()}) == 3
    assert sorted(jobs[b.parent.span_id].context.trace_id for b in batches) == sorted(
        j.context.trace_id for j in jobs.values()
    )
    assert all(b.context.trace_id == jobs[b.parent.span_id].context.trace_id for b in batches)
    assert len({b.attributes["ofa.batch.id"] for b in batches}) == 1
    assert {b.attributes["ofa.batch.size"] for b in batches} == {3}
    assert sorted(b.attributes["ofa.batch.position"] for b in batches) == [0, 1, 2]


def test_the_record_keeps_the_first_trace_for_joins_and_resends(api, db, settings, spans):
    image = small_jpeg(seed=72)
    first = api.post("/v1/jobs", data={"text": "a cat"}, files={"image": ("a.jpg", image)})
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    headers, _, _ = taken(db, queue_name(*INPROC_MODEL))
    jobs = wiring.stores(settings, sync=wiring.sync_redis(settings)).jobs
    record = jobs.record(job_id)
    assert record[tracing.TRACEPARENT] == headers[tracing.TRACEPARENT]
    # Another request joins the job: a trace of its own, the record keeps the first.
    again = api.post("/v1/jobs", data={"text": "a cat"}, files={"image": ("a.jpg", image)})
    assert again.json()["job_id"] == job_id
    submits = [s for s in spans.get_finished_spans() if s.name == "ofa.submit"]
    assert len({s.context.trace_id for s in submits}) == 2
    assert jobs.record(job_id)[tracing.TRACEPARENT] == headers[tracing.TRACEPARENT]
    # The reaper's re-send rebuilds the message from the record: the same trace, and
    # the message the API would have built for it (but for the time it was sent).
    celery = make_celery(settings)
    msg = message_of(job_id, jobs.record(job_id))
    send_job(celery, msg)
    _, ours = entail_message(celery, msg, record[tracing.TRACEPARENT])
    [theirs] = [readable(raw) for raw in db.lrange(queue_name(*INPROC_MODEL), 0, -1)]
    mine = readable(ours)
    for envelope in (theirs, mine):
        del envelope["headers"]["kwargsrepr"], envelope["headers"][tracing.SENT_AT]
    assert mine == theirs and theirs["headers"][tracing.TRACEPARENT] == record["traceparent"]
    assert "traceparent" not in json.dumps(theirs["body"])  # never in the body
    db.delete(queue_name(*INPROC_MODEL))


def test_off_nothing_is_carried(db, settings):
    """Off (the default), the message and the record carry no trace, and no span is
    made even where a message carries one."""
    off = settings.model_copy(update={"opentelemetry": False})
    with TestClient(create_app(off), headers={"X-API-Key": API_KEY}) as client:
        assert not tracing.on()
        resp = client.post(
            "/v1/jobs", data={"text": "a"}, files={"image": ("a.jpg", small_jpeg(73))}
        )
    assert resp.status_code == 202, resp.text
    headers, _, _ = taken(db, queue_name(*INPROC_MODEL))
    assert tracing.TRACEPARENT not in headers and tracing.SENT_AT not in headers
    jobs = wiring.stores(off, sync=wiring.sync_redis(off)).jobs
    assert tracing.TRACEPARENT not in jobs.record(resp.json()["job_id"])
    with tracing.span("ofa.submit") as traceparent:
        assert traceparent is None
    assert tracing.outgoing() == {} and tracing.message_headers(None) is None
