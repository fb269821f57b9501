"""Prometheus metrics of every Kinora process, and `/metrics` (README, Try it with curl).

Processes that share a host share one directory of metric files (prometheus_client's
multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`): the API's uvicorn workers, and under
`kinora up` the Celery workers too, so one scrape of `/metrics` sees them all. Workers
on other hosts serve the same format themselves (`kinora worker --metrics-port`).
Without the directory (a library user, the tests' own process) the metrics live in
the process.

Videos by status are read from the database at scrape time: it is the truth about
them, and every API process gives the same answer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kinora.core.config import metrics_dir

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The live-progress layer's metrics (events published, deliveries, stream clients) are
# its own: kinora.streaming.metrics, registered in the same default registry.
TASKS = Counter("kinora_tasks_total", "Generation task runs, by outcome", ["outcome"])
TASK_SECONDS = Histogram(
    "kinora_task_duration_seconds",
    "Duration of a generation task run, by outcome",
    ["outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, float("inf")),
)
MODEL_SECONDS = Histogram(
    "kinora_model_call_duration_seconds",
    "Latency of calls to the video model, by call",
    ["call"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
)
MODEL_ERRORS = Counter("kinora_model_call_errors_total", "Failed model calls, by call", ["call"])


_LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db$")


def _forget_dead_processes(directory: str) -> None:
    """Drop the live gauges of processes that are gone (a crashed or restarted
    worker), so they stop counting as connected clients."""
    for name in os.listdir(directory):
        match = _LIVE_FILE.match(name)
        if match and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render(*extra: Collector) -> bytes:
    """The text exposition of every process's metrics, plus `extra` collectors."""
    directory = metrics_dir()
    if directory:
        _forget_dead_processes(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


class VideosByStatus(Collector):
    """`kinora_videos{status=...}` from the database, at scrape time."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("kinora_videos", "Videos by status", labels=["status"])
        for status, count in sorted(self.counts.items()):
            family.add_metric([status], count)
        yield family
