"""Traces (README, Traces): with an OTLP endpoint set, `kinora api` and `kinora worker`
export their spans, and one video's generation is ONE trace, from the request that
submitted it through the queued task to the Redis commands that published its events;
the trace id is the one in the response's `X-Trace-Id`, in every event of the video,
and in every error body. Real processes; the collector is a local OTLP/HTTP receiver
that decodes what they send (the protocol an operator's collector speaks)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from kinora.core import tracing
from tests.utils.accounts import Account
from tests.utils.clients import events_of, read_stream, submit
from tests.utils.cluster import plain_server
from tests.utils.processes import Stack, kinora, start_api, stop, wait_for, worker_ready


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    start: int  # ns since the epoch


class Collector(ThreadingHTTPServer):
    """Receives OTLP/HTTP trace exports (protobuf) and keeps their spans."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Receiver)
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def keep(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    found.append(
                        Span(
                            service=attrs.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            start=span.start_time_unix_nano,
                            attributes={
                                a.key: a.value.string_value or a.value.int_value
                                for a in span.attributes
                            },
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def of(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


class Receiver(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        assert self.path == "/v1/traces", self.path
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.keep(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    """A queue of the test's own: no other test's worker takes its video."""
    with plain_server(tmp_path) as (url, _):
        yield url


@pytest.fixture
def traced(
    environment: dict[str, str], var_dir: Path, collector: Collector, broker: str
) -> Iterator[Stack]:
    env = {
        **environment,
        "BROKER_URL": broker,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within a fifth of a second
    }
    logs = var_dir / "logs"
    logs.mkdir(exist_ok=True)
    worker = kinora("worker", "--concurrency", "1", env=env, log=logs / "traced-worker.log")
    api, base = start_api(env, logs / "traced-api.log")
    try:
        wait_for("the worker", lambda: worker_ready(env), timeout=30, interval=0.2)
        yield Stack(base, api, worker, logs)
    finally:
        stop(api)
        stop(worker, timeout=3)


@pytest.mark.slow
def test_one_trace_from_the_submit_to_the_complete(
    traced: Stack, collector: Collector, account: Account
) -> None:
    created = submit(traced, account, "A lighthouse beam sweeping over a night sea")
    status, lines = read_stream(created["stream_url"], timeout=60)
    events = events_of(lines)
    assert status == 200
    assert events[-1]["type"] == "complete"
    with traced.client(account) as client:
        submitted = client.get(f"/api/v1/videos/{created['video_id']}")
        missing = client.get("/api/v1/videos/999999999")
    trace_id = submitted.headers["X-Trace-Id"]
    assert len(trace_id) == 32
    assert int(trace_id, 16)  # an OpenTelemetry trace id, not a made-up one
    # An error body quotes its request's trace.
    assert missing.status_code == 404
    assert missing.json()["trace_id"] == missing.headers["X-Trace-Id"]

    # The video's events all carry the trace id of the request that submitted it.
    traces = {e.get("trace_id") for e in events if e["type"] != "heartbeat"}
    assert len(traces) == 1, [(e["seq"], e["type"], e.get("trace_id")) for e in events]
    (video_trace,) = traces
    assert video_trace
    assert len(video_trace) == 32

    def whole() -> bool:
        spans = collector.of(video_trace)
        return any(s.service == "kinora-worker" and s.kind == 5 for s in spans) and any(
            s.attributes.get("db.system") == "redis" and s.service == "kinora-worker" for s in spans
        )

    wait_for("the worker's spans of the video", whole, timeout=20)
    spans = collector.of(video_trace)
    by_id = {s.span_id: s for s in spans}
    (request,) = [s for s in spans if s.kind == 2]  # SERVER: the submit
    assert request.service == "kinora-api"
    assert request.name == "POST /api/v1/videos/generate"
    assert request.parent_id == ""  # the trace's root
    published = [s for s in spans if s.kind == 4]  # PRODUCER: the task queued
    assert published
    assert all(s.service == "kinora-api" for s in published)
    (task,) = [s for s in spans if s.kind == 5]  # CONSUMER: the task run
    assert task.service == "kinora-worker"
    assert by_id[task.parent_id] in published  # queued by the request, run in the worker
    # The generation's three stages are spans under the task run, in order.
    stages = sorted((s for s in spans if s.name.startswith("video.")), key=lambda s: s.start)
    assert [s.name for s in stages] == ["video.preparing", "video.generating", "video.finalizing"]
    assert all(by_id[s.parent_id] == task for s in stages)
    # The task's Redis commands (its events published) and SQL statements are its
    # children; the request's own (the claim, the charge) are the request's.
    worker_calls = [s for s in spans if s.service == "kinora-worker" and s.kind == 3]
    systems = {s.attributes.get("db.system") for s in worker_calls}
    assert {"redis", "sqlite"} <= systems or {"redis", "postgresql"} <= systems, systems
    for span in worker_calls:
        ancestor = span
        while ancestor.parent_id and ancestor.parent_id in by_id:
            ancestor = by_id[ancestor.parent_id]
        assert ancestor == request, (span.name, ancestor.name)
    api_calls = [s for s in spans if s.service == "kinora-api" and s.kind == 3]
    assert api_calls, "the request's own database and Redis calls"
    # Nothing outside a request or a task started a trace of its own: every span
    # exported belongs to a trace whose root is a request or a task run.
    with collector.lock:
        everything = list(collector.spans)
    roots = [s for s in everything if s.parent_id == ""]
    assert roots
    assert all(s.kind in (2, 5) for s in roots), {(s.service, s.name) for s in roots}


def test_traces_are_on_only_with_an_endpoint() -> None:
    """No endpoint (or OTEL_SDK_DISABLED=true): no spans; the API's own trace ids."""
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318"})
    assert not tracing.configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
