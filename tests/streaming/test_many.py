"""One connection, many jobs, in a library host (docs/protocol.md §6): `{prefix}/stream?
job=…` carries every event of every listed job, each job's in its own order, none
missing, none twice; each event's `id:` resumes them all; the stream ends when every
job has. A real Redis, uvicorn on 127.0.0.1, jobs published with SSELogger."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from kinora.streaming import SSELogger, progress_router
from tests.utils.clients import events_of, read_stream
from tests.utils.servers import serve


@pytest.fixture
def host(environment: dict[str, str]) -> Iterator[str]:
    app = FastAPI(title="not Kinora")
    app.include_router(
        progress_router(authorize=lambda request, job_id: not job_id.startswith("secret")),
        prefix="/progress",
    )
    with serve(app) as base:
        yield base


def new_jobs(count: int) -> list[str]:
    stamp = time.monotonic_ns()
    return [f"part-{stamp}-{i}" for i in range(count)]


def url_of(host: str, jobs: list[str]) -> str:
    return f"{host}/progress/stream?" + "&".join(f"job={job}" for job in jobs)


def publish(loggers: dict[str, SSELogger], rounds: int, seed: int) -> None:
    """`rounds` events per job, the jobs interleaved at random."""
    order = [job for job in loggers for _ in range(rounds)]
    random.Random(seed).shuffle(order)
    done = dict.fromkeys(loggers, 0)
    for job in order:
        done[job] += 1
        loggers[job].update(done[job], rounds)


def by_job(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for event in events:
        seqs.setdefault(event["job_id"], []).append(event["seq"])
    return seqs


def test_eight_jobs_on_one_stream_each_in_order_and_the_stream_ends_with_the_last(
    host: str,
) -> None:
    jobs = new_jobs(8)
    loggers = {job: SSELogger(job, kind="job") for job in jobs}
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", url_of(host, jobs)) as response,
    ):
        assert response.status_code == 200
        publish(loggers, 5, seed=1)
        for logger in loggers.values():
            logger.complete()
        lines = list(response.iter_lines())  # the server ends the response
    events = events_of(lines)
    assert by_job(events) == {job: [1, 2, 3, 4, 5, 6] for job in jobs}
    assert sum(e["type"] == "complete" for e in events) == 8
    # Each event's id is the stream's cursor: every job at once.
    ids = [line[4:] for line in lines if line.startswith("id: ")]
    assert len(ids) == len(events)
    last = dict(entry.rsplit(":", 1) for entry in ids[-1].split(","))
    assert last == {job: "6" for job in jobs}
    # The client has every end: a reconnect with that id is a 204 (EventSource stops).
    again = httpx.get(url_of(host, jobs), headers={"Last-Event-ID": ids[-1]}, timeout=10)
    assert again.status_code == 204


def test_a_reconnect_with_the_last_id_resumes_every_job_exactly_after_what_it_received(
    host: str,
) -> None:
    jobs = new_jobs(4)
    loggers = {job: SSELogger(job, kind="job") for job in jobs}
    publish(loggers, 3, seed=2)
    # The first connection drops after seven events.
    status, first = read_stream(url_of(host, jobs), limit=7, timeout=10)
    assert status == 200
    cursor = [line[4:] for line in first if line.startswith("id: ")][-1]
    publish(loggers, 3, seed=3)  # numbered 4-6
    for logger in loggers.values():
        logger.complete()
    status, second = read_stream(url_of(host, jobs), headers={"Last-Event-ID": cursor}, timeout=10)
    assert status == 200
    seen = by_job(events_of(first) + events_of(second))
    assert seen == {job: list(range(1, 8)) for job in jobs}


def test_a_finished_job_on_a_late_stream_and_the_requests_that_are_refused(host: str) -> None:
    done, running = new_jobs(2)
    with SSELogger(done, kind="job") as log:
        log.update(1, 1)
        log.complete()
    SSELogger(running, kind="job").log("started")
    status, lines = read_stream(url_of(host, [done, running]), limit=3, timeout=10)
    assert status == 200
    assert by_job(events_of(lines)) == {done: [1, 2], running: [1]}

    with httpx.Client(timeout=10) as client:
        refused = client.get(url_of(host, [done, "secret-1"]))
        assert refused.status_code == 404
        assert refused.json()["detail"] == "job secret-1 not found"
        many = client.get(url_of(host, [f"j{i}" for i in range(51)]))
        assert many.status_code == 422
        assert "at most 50" in many.json()["detail"]
        assert client.get(f"{host}/progress/stream").status_code == 422
        bad = client.get(url_of(host, [done]), headers={"Last-Event-ID": "12"})
        assert bad.status_code == 400
        assert "malformed Last-Event-ID" in bad.json()["detail"]
