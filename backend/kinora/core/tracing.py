"""OpenTelemetry traces (`pip install 'kinora[otel]'`; README, Traces).

Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true` turns it off again).
Then each process exports its spans over OTLP/HTTP: the API's requests (FastAPI),
the task published and run (Celery, which carries the trace context in the message
headers, from the request that queued it to the worker that runs it), every Redis
command and SQL statement made within them (redis-py, SQLAlchemy). A request's trace
id is then the trace's: the `X-Trace-Id` header, every error body, every log line and
every event of the job it queued carry it.

Without it, the API gives each request a trace id of its own (kinora.api.middleware)
and the job carries it (its task's `trace_id`): the same promises, no spans.

A Redis or SQL call outside any request or task (the hub's probe, the broker's
polling, the sweeper) starts no trace: only spans under a request or a task are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from kinora.core import logs

log = logging.getLogger(__name__)

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
EXTRA = "pip install 'kinora[otel]'"

_started: str | None = None  # the service this process traces as


def configured(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINTS)


def start(service: str) -> bool:
    """Trace this process as `service` (the API's or a worker's pool process), once;
    True when spans are exported. Call it before the process makes its database engine
    (SQLAlchemy's instrumentation wraps the engines made after it)."""
    global _started
    if _started is not None:
        return True
    if not configured():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError as exc:
        log.warning(
            "an OTLP endpoint is set but OpenTelemetry is not installed (%s): %s", exc, EXTRA
        )
        return False
    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}),
        sampler=ParentBased(root=_sampler()),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument()
    # Its declared range stops below SQLAlchemy 2.1, whose event API it uses unchanged.
    SQLAlchemyInstrumentor().instrument(skip_dep_check=True)
    logs.span_trace_id = _span_trace_id
    _started = name
    log.info("tracing as %s to %s", name, _endpoint())
    return True


def active() -> bool:
    """Whether this process exports traces."""
    return _started is not None


def instrument_app(app: Any) -> None:
    """The API's requests as server spans (their trace id becomes the request's)."""
    if _started is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # A stream's body goes straight to the server (kinora.streaming.sse.direct_writes);
    # its head alone passes through here: no span per write or read.
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])


@contextlib.contextmanager
def span(name: str, **attributes: str | int) -> Iterator[None]:
    """A span of this process's own work (a stage of a generation), under the current
    one; nothing when traces are off."""
    if _started is None:
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer("kinora").start_as_current_span(name, attributes=attributes):
        yield


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered (a process about to end)."""
    if _started is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(timeout_ms)


def _endpoint() -> str:
    return next((os.environ[n] for n in reversed(ENDPOINTS) if os.environ.get(n)), "")


def _span_trace_id() -> str | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _sampler() -> Any:
    """Roots: a request or a task is traced (at the rate OTEL_TRACES_SAMPLER_ARG says,
    all by default); a client call (Redis, SQL, a publish) with no request or task
    above it is not a trace of its own."""
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        Decision,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )
    from opentelemetry.trace import Link, SpanKind, TraceState
    from opentelemetry.util.types import Attributes

    ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    requests = TraceIdRatioBased(float(ratio)) if ratio else ALWAYS_ON

    class NoStrayClients(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if kind in (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.INTERNAL):
                return SamplingResult(Decision.DROP)
            return requests.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"NoStrayClients({requests.get_description()})"

    return NoStrayClients()
