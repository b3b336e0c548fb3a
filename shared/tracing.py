"""One trace per job: the OpenTelemetry context a job carries from the API, through its
record and its Celery message, to the worker and to its webhook delivery.

One switch, ``OFA_OPENTELEMETRY`` (off by default), turns on FastAPI's own
instrumentation and these spans together. Off, every hook here is one check of a
module global (``_tracer is None``) and OpenTelemetry is never imported: the request
path costs what it would without any tracing code.

On, ``configure`` uses the SDK's tracer provider already installed in the process (by
``opentelemetry-instrument``, or a test), else installs one exporting over OTLP/HTTP
(the ``tracing`` extra; ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other ``OTEL_*``
variables as the SDK reads them). The context travels as W3C ``traceparent``:

- the API's ``ofa.submit`` span (a child of FastAPI's request span) is written into the
  new job's record (field ``traceparent``) and into its message's headers, with the
  time it was sent (``ofa_sent_at``); a submission that joins a job keeps the first
  trace; the reaper's re-send rebuilds the message from the record, so it keeps it too;
- the worker's spans (``worker/tracing.py``) continue it; the job's webhook messages
  carry the worker's job span, and the delivery (``ofa.webhook``) continues that and
  sends ``traceparent`` on to the receiver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from shared.settings import Settings

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # W3C Trace Context: the header, and the job record's field
SENT_AT = "ofa_sent_at"  # message header: when it was sent (epoch seconds), queue wait's start
TRACER_NAME = "ofa-entail"

# None: tracing is off (the one thing every hook looks at). Set by ``configure``.
_tracer: Any = None
_provider: Any = None  # the tracer provider spans go to, once one is chosen


def configure(settings: Settings, service: str, provider: Any = None) -> None:
    """Turn tracing on or off for this process as ``settings.opentelemetry`` says;
    ``service``: the ``service.name`` of a provider made here; ``provider``: use this
    one (a test's). A provider chosen once is kept for the process's life."""
    global _tracer, _provider
    if not settings.opentelemetry:
        _tracer = None
        return
    from opentelemetry import trace

    if provider is not None:
        _provider = provider
    elif _provider is None:
        _provider = _installed_provider(service)
    _tracer = (_provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)


def _installed_provider(service: str) -> Any:
    """The SDK's global provider if one is set, else a new one exporting over OTLP/HTTP,
    made global (so FastAPI's and any library's spans go there too); None without the
    SDK (then the API's global provider, a no-op unless something else installed one)."""
    from opentelemetry import trace

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("OFA_OPENTELEMETRY is on but opentelemetry-sdk is not installed")
        return None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        logger.warning("no OTLP exporter installed (the tracing extra): spans are dropped")
    else:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def forget() -> None:
    """Tracing off and the chosen provider forgotten (tests; a process that exits)."""
    global _tracer, _provider
    _tracer = None
    _provider = None


def on() -> bool:
    """Whether this process traces."""
    return _tracer is not None


def provider() -> Any:
    """The tracer provider spans go to, or None (off, or the global one)."""
    return _provider if _tracer is not None else None


def tracer() -> Any:
    """This package's tracer (only while on)."""
    assert _tracer is not None, "tracing is off"
    return _tracer


def context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry context a ``traceparent`` names (empty for None)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: traceparent} if traceparent else {}
    return TraceContextTextMapPropagator().extract(carrier)


def traceparent_of(span: Any) -> str | None:
    """The ``traceparent`` of ``span`` (what a child in another process continues)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT)


@contextlib.contextmanager
def _span(
    name: str, parent: str | None, attributes: Mapping[str, Any], kind: str
) -> Iterator[str | None]:
    from opentelemetry import trace

    context = context_of(parent) if parent else None
    with tracer().start_as_current_span(
        name, context=context, kind=getattr(trace.SpanKind, kind), attributes=dict(attributes)
    ) as span:
        yield traceparent_of(span)


_OFF = contextlib.nullcontext(None)


def span(
    name: str,
    parent: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    kind: str = "INTERNAL",
) -> contextlib.AbstractContextManager[str | None]:
    """A span around the block (the current span while it runs), a child of ``parent``
    (a ``traceparent``) or else of the current span; the block gets its ``traceparent``
    to pass on. Off: a shared no-op that gives None."""
    if _tracer is None:
        return _OFF
    return _span(name, parent, attributes or {}, kind)


def set_attribute(name: str, value: Any) -> None:
    """Set an attribute on the current span (nothing while off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute(name, value)


def message_headers(traceparent: str | None) -> dict[str, str] | None:
    """The headers a Celery message carries for a job traced as ``traceparent``: the
    context and the time it was sent; None when there is nothing to carry."""
    if not traceparent:
        return None
    return {TRACEPARENT: traceparent, SENT_AT: f"{time.time():.6f}"}


def carried(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace header of a received message, to put on the next message for the same
    work (a retry); empty when it has none."""
    value = (headers or {}).get(TRACEPARENT)
    return {TRACEPARENT: str(value)} if value else {}


def outgoing() -> dict[str, str]:
    """``traceparent`` for an outgoing HTTP request, naming the current span (empty while
    off): a webhook receiver that traces continues the job's trace."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return {k: v for k, v in carrier.items() if k == TRACEPARENT}
