"""The live-progress layer's Prometheus metrics, registered when a host builds a core
(or a job first publishes), in the registry it names: prometheus_client's default
unless told otherwise. Nothing is registered at import."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class StreamMetrics:
    """The layer's counters in one registry. One per registry (`of`): a second core in
    the same process (the tests, two apps) counts into the same series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_published = Counter(
            "kinora_events_published_total",
            "Events published to Redis, by type",
            ["type"],
            registry=registry,
        )
        self.events_not_published = Counter(
            "kinora_events_publish_failures_total",
            "Events that could not be published (Redis unreachable); the job went on",
            registry=registry,
        )
        self.deliveries = Counter(
            "kinora_event_deliveries_total",
            "Events written to stream clients",
            ["transport"],
            registry=registry,
        )
        self.clients = Gauge(
            "kinora_stream_clients",
            "Stream clients connected now",
            ["transport"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.clients_cut = Counter(
            "kinora_stream_clients_cut_total",
            "Stream clients cut off for falling too far behind (they resume with Last-Event-ID)",
            ["transport"],
            registry=registry,
        )
        self._published: dict[str, Any] = {}

    def published(self, event_type: str) -> Any:
        """The counter of published events of a type (its child found once, not per event)."""
        child = self._published.get(event_type)
        if child is None:
            child = self._published[event_type] = self.events_published.labels(event_type)
        return child

    @staticmethod
    def of(registry: CollectorRegistry | None = None) -> StreamMetrics:
        registry = REGISTRY if registry is None else registry
        with _lock:
            found = _by_registry.get(registry)
            if found is None:
                found = _by_registry[registry] = StreamMetrics(registry)
            return found


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, StreamMetrics] = (
    weakref.WeakKeyDictionary()
)
