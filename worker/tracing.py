"""A job's spans on the worker, continuing the trace its message carries
(``shared/tracing.py``).

Per traced job, one ``ofa.job`` span (a child of the API's ``ofa.submit``) from the
moment its message was sent until its outcome is recorded, with three children:
``ofa.queue`` (sent until a worker thread took it), ``ofa.prepare`` (taken until handed
to the batcher: the start script, the hash check, decode, resize, tokens) and
``ofa.batch`` (the model pass the job rode in).

A batch serves many jobs from many traces. It gets a span per job per batch, in each
job's own trace, rather than one batch span linked to every job's span: a trace's
waterfall then shows what this job waited for and how long its batch took, which
links do not (trace viewers list links, they do not draw them); each ``ofa.batch``
span names the batch (``ofa.batch.id``, the same for every job in it, and its size),
so a search by that id finds every job that rode in it. The batch times come from a
wrapper around the batcher's function, installed the first time a traced job is
handed to it; jobs without a trace context (scan jobs) make no spans at all.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared import tracing

logger = logging.getLogger(__name__)


class JobTrace:
    """The spans of one job on this worker."""

    def __init__(self, job_id: str, headers: Mapping[str, Any], taken_ns: int) -> None:
        from opentelemetry import trace

        parent = tracing.context_of(str(headers.get(tracing.TRACEPARENT)))
        sent_at = headers.get(tracing.SENT_AT)
        try:
            sent_ns = min(int(float(str(sent_at)) * 1e9), taken_ns) if sent_at else taken_ns
        except ValueError:
            sent_ns = taken_ns
        self.taken_ns = taken_ns
        self.span = tracing.tracer().start_span(
            "ofa.job",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={"ofa.job.id": job_id},
            start_time=sent_ns,
        )
        self._context = trace.set_span_in_context(self.span)
        self.child("ofa.queue", sent_ns, taken_ns)

    def child(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A finished child span of the job's."""
        span = tracing.tracer().start_span(
            name, context=self._context, attributes=attributes, start_time=start_ns
        )
        span.end(end_time=end_ns)

    def traceparent(self) -> str | None:
        """The job span's context, for the job's webhook messages."""
        return tracing.traceparent_of(self.span)

    def end(self, outcome: str) -> None:
        self.span.set_attribute("ofa.job.outcome", outcome)
        self.span.end()


def taken(
    job_ids: Sequence[str], headers: Sequence[Mapping[str, Any] | None]
) -> list[JobTrace | None]:
    """The traces of jobs just taken (their messages' headers, in order); empty while
    tracing is off, a None for each message that carries no context."""
    if not tracing.on():
        return []
    now = time.time_ns()
    return [
        JobTrace(job_id, h, now) if h and h.get(tracing.TRACEPARENT) else None
        for job_id, h in zip(job_ids, headers, strict=True)
    ]


# Items handed to the batcher, by id(item): the trace of the job each belongs to, until
# the batch that runs it takes it out.
_riding: dict[int, JobTrace] = {}
_riding_lock = threading.Lock()


def handed(batcher: Any, items: Sequence[Any], traces: Sequence[JobTrace | None]) -> None:
    """Jobs about to be handed to ``batcher``: their preparation ends now, and the batch
    each rides in will add its span."""
    now = time.time_ns()
    with _riding_lock:
        _instrument(batcher)
        for item, job in zip(items, traces, strict=True):
            if job is not None:
                job.child("ofa.prepare", job.taken_ns, now)
                _riding[id(item)] = job


def _instrument(batcher: Any) -> None:
    """Wrap the batcher's function (once) so that each batch adds an ``ofa.batch``
    span to the trace of every traced job in it."""
    fn: Callable[[Sequence[Any]], Any] = batcher.fn
    if getattr(fn, "ofa_traced", False):
        return

    def traced(items: Sequence[Any]) -> Any:
        with _riding_lock:
            jobs = [_riding.pop(id(item), None) for item in items]
        if not any(jobs):
            return fn(items)
        start = time.time_ns()
        batch_id = uuid.uuid4().hex[:16]
        ok = False
        try:
            results = fn(items)
            ok = True
            return results
        finally:
            end = time.time_ns()
            for position, job in enumerate(jobs):
                if job is not None:
                    job.child(
                        "ofa.batch",
                        start,
                        end,
                        **{
                            "ofa.batch.id": batch_id,
                            "ofa.batch.size": len(items),
                            "ofa.batch.position": position,
                            "ofa.batch.ok": ok,
                        },
                    )

    traced.ofa_traced = True  # type: ignore[attr-defined]
    batcher.fn = traced
