"""`/metrics` as Prometheus scrapes it, from the API and the worker of a real stack."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from kinora.core.db import session_scope
from kinora.core.models import Video
from tests.utils.accounts import Account
from tests.utils.clients import events_of, read_stream, submit
from tests.utils.processes import Stack, wait_for

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(stack: Stack) -> Samples:
    response = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_a_video_shows_in_events_deliveries_tasks_and_model_latency(
    stack: Stack, account: Account
) -> None:
    before = scrape(stack)
    created = submit(stack, account, "A paper boat drifting down a gutter stream")
    _, lines = read_stream(created["stream_url"], timeout=60)
    events = events_of(lines)
    assert events[-1]["status"] == "completed"

    def counted() -> bool:
        # The worker counts its task as it returns; the API adds up its deliveries
        # once a second.
        now = scrape(stack)
        name = "kinora_event_deliveries_total"
        return value(now, "kinora_tasks_total", outcome="completed") > value(
            before, "kinora_tasks_total", outcome="completed"
        ) and total(now, name) - total(before, name) >= len(events)

    wait_for("the task's outcome and deliveries in /metrics", counted, timeout=10)
    after = scrape(stack)
    grew = {
        name: total(after, name) - total(before, name)
        for name in (
            "kinora_events_published_total",
            "kinora_event_deliveries_total",
            "kinora_task_duration_seconds_count",
        )
    }
    assert grew["kinora_events_published_total"] >= len(events)
    assert grew["kinora_event_deliveries_total"] >= len(events)
    assert grew["kinora_task_duration_seconds_count"] >= 1
    for call in ("create", "retrieve", "download"):
        name = "kinora_model_call_duration_seconds_count"
        assert value(after, name, call=call) > value(before, name, call=call), call


def test_connected_clients_count_while_a_stream_is_open(stack: Stack, account: Account) -> None:
    created = submit(stack, account, "[mock:stall] a clock that never strikes")
    before = value(scrape(stack), "kinora_stream_clients", transport="sse")
    stop = threading.Event()

    def watch() -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=2)) as client,
            client.stream("GET", created["stream_url"]) as response,
        ):
            for _line in response.iter_lines():
                if stop.is_set():
                    return

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        wait_for(
            "the open stream in /metrics",
            lambda: value(scrape(stack), "kinora_stream_clients", transport="sse") == before + 1,
            timeout=10,
        )
    finally:
        stop.set()
        reader.join(15)
    wait_for(
        "the closed stream to leave /metrics",
        lambda: value(scrape(stack), "kinora_stream_clients", transport="sse") == before,
        timeout=15,
    )
    with stack.client(account) as client:
        client.post(f"/api/v1/videos/{created['video_id']}/cancel")


def database_counts() -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(select(Video.status, func.count()).group_by(Video.status))
        return {str(status): count for status, count in rows}


def test_videos_by_status_match_the_database(stack: Stack) -> None:
    # Videos of earlier tests may still be moving: compare a scrape with two equal
    # reads of the database around it.
    for _ in range(20):
        first = database_counts()
        samples = scrape(stack)
        if database_counts() == first:
            break
    else:
        pytest.fail("the videos never stood still for one scrape")
    for status in ("pending", "processing", "completed", "failed", "cancelled"):
        assert value(samples, "kinora_videos", status=status) == first.get(status, 0), status
