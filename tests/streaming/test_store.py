"""A library host with a store (docs/library.md, "A store") keeps the promises Kinora's
videos keep when Redis loses a job's data (docs/protocol.md, "Faults"): the stream
ends with the job's outcome, as the store has it; `seq` never goes backwards, even for
a new process's logger; `history_lost` carries the job's state. A real Redis, a real
SQLite database, uvicorn on 127.0.0.1; the job's keys are deleted from Redis, as a
flush or a failover to an empty replica would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI

from kinora.streaming import (
    ProgressCore,
    SQLStore,
    SSELogger,
    StreamSettings,
    keys,
    progress_router,
)
from kinora.streaming.keys import StreamKey
from tests.utils.clients import events_of, read_stream
from tests.utils.servers import serve


@pytest.fixture
def store(tmp_path: Path, environment: dict[str, str]) -> Iterator[SQLStore]:
    found = SQLStore(f"sqlite:///{tmp_path / 'host.db'}")
    yield found
    found.engine.dispose()


@pytest.fixture
def host(store: SQLStore) -> Iterator[str]:
    app = FastAPI(title="not Kinora")
    router = progress_router(authorize=lambda request, job_id: True, store=store)
    app.include_router(router, prefix="/progress")
    with serve(app) as base:
        yield base


def lose(client: redis.Redis, key: StreamKey) -> None:
    """Redis loses everything of the job (a flush, an empty replica promoted)."""
    client.delete(key.history, key.seq, key.end, key.sent)


def new_job() -> str:
    return f"render-{time.monotonic_ns()}"


def test_a_finished_jobs_stream_ends_with_its_outcome_after_redis_lost_its_events(
    store: SQLStore, host: str, redis_client: redis.Redis
) -> None:
    job = new_job()
    with SSELogger(job, kind="job", store=store) as log:
        for i in range(1, 6):
            log.update(i, 5, f"part {i}")
        log.complete(result_url="https://files.example/report.csv")
    lose(redis_client, keys.job(job))
    url = f"{host}/progress/{job}/stream"

    # A client that had seen event 3 before the loss.
    status, lines = read_stream(url, headers={"Last-Event-ID": "3"}, timeout=10)
    assert status == 200
    events = events_of(lines)
    lost, end = events
    assert (lost["code"], lost["status"], lost["progress"]) == ("history_lost", "completed", 100)
    assert (end["type"], end["status"], end["seq"]) == ("complete", "completed", 6)
    assert end["result_url"] == "https://files.example/report.csv"
    # It has the end now: EventSource stops on a 204.
    assert httpx.get(url, headers={"Last-Event-ID": "6"}, timeout=10).status_code == 204
    # A new client gets the end too, and polling says the job completed.
    status, lines = read_stream(url, timeout=10)
    assert [e["type"] for e in events_of(lines)][-1] == "complete"
    snapshot = httpx.get(f"{host}/progress/{job}", timeout=10).json()
    assert (snapshot["status"], snapshot["progress"]) == ("completed", 100)


def test_a_failed_jobs_rebuilt_end_says_why(
    store: SQLStore, host: str, redis_client: redis.Redis
) -> None:
    job = new_job()

    def task() -> None:
        with SSELogger(job, kind="job", store=store) as log:
            log.update(1, 4)
            raise RuntimeError("the input file is empty")

    with pytest.raises(RuntimeError):
        task()
    lose(redis_client, keys.job(job))
    status, lines = read_stream(f"{host}/progress/{job}/stream", timeout=10)
    assert status == 200
    end = events_of(lines)[-1]
    assert (end["type"], end["status"]) == ("complete", "failed")
    assert "the input file is empty" in end["message"]


def test_seq_never_goes_backwards_for_a_new_processs_logger(
    store: SQLStore, host: str, redis_client: redis.Redis
) -> None:
    job = new_job()
    first = SSELogger(job, kind="job", store=store)
    published = [first.update(i, 100) for i in range(1, 41)]
    assert published == list(range(1, 41))
    lose(redis_client, keys.job(job))
    url = f"{host}/progress/{job}/stream"
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", url, headers={"Last-Event-ID": "40"}) as response,
    ):
        assert response.status_code == 200
        # The task is retried in another process: a logger that knows nothing but the store.
        again = SSELogger(job, kind="job", store=store)
        resumed = again.log("resumed after a restart")
        again.complete()
        events: list[dict[str, Any]] = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.extend(events_of([line]))
                if events[-1]["type"] == "complete":
                    break
    assert resumed is not None
    assert resumed > 40
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs), seqs
    # The job's events after the loss are numbered above everything the client saw (a
    # `history_lost` notice, if the stream got there first, resumes at 40 at the lowest).
    told = [e for e in events if e.get("code") != "history_lost"]
    assert min(e["seq"] for e in told) > 40, seqs
    assert told[0]["message"] == "resumed after a restart"
    assert events[-1]["type"] == "complete"


def test_an_end_redis_never_took_is_published_from_the_store(
    store: SQLStore, host: str, redis_client: redis.Redis
) -> None:
    """The job completed while Redis could not take its `complete` (it waited in the
    logger's outbox, and the process ended): a stream publishes it from the store once
    the job has been over a while, at the seq after the floor."""
    job = new_job()
    key = keys.job(job)
    log = SSELogger(job, kind="job", store=store)
    log.update(1, 2)
    log.update(2, 2)
    store.record(key, 2, status="completed", progress=100)  # what complete() writes first
    with store.engine.begin() as conn:  # a minute ago
        conn.execute(sa.update(store.table).values(ended_at=time.time() - 60))
    status, lines = read_stream(f"{host}/progress/{job}/stream?last_event_id=2", timeout=10)
    assert status == 200
    (end,) = events_of(lines)
    assert (end["type"], end["status"], end["seq"]) == ("complete", "completed", 3)
    record = store._load(key)
    assert record is not None
    assert record.end_seq == 3


def test_a_live_stream_ends_when_its_job_ended_with_its_last_events_lost(
    store: SQLStore, environment: dict[str, str]
) -> None:
    """The stall a failover left: the worker recorded the job's outcome, then died with
    its last events (and the `complete`) unpublished. A stream already open hears
    nothing more from Redis; it looks at the store again once it has been quiet a
    while, and ends with the job's outcome, the gap announced."""
    settings = StreamSettings(redis_url=environment["REDIS_URL"], recheck_idle_seconds=0.5)
    app = FastAPI(title="not Kinora")
    router = progress_router(
        authorize=lambda request, job_id: True, store=store, core=ProgressCore(settings)
    )
    app.include_router(router, prefix="/progress")
    job = new_job()
    key = keys.job(job)
    log = SSELogger(job, kind="job", store=store)
    events: list[dict[str, Any]] = []
    with (
        serve(app) as base,
        httpx.Client(timeout=httpx.Timeout(10, read=10)) as client,
        client.stream("GET", f"{base}/progress/{job}/stream") as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for i in range(1, 4):
            log.update(i, 5, f"part {i}")
            while not events or events[-1]["seq"] < i:
                line = next(lines)
                events.extend(events_of([line]))
        # Events 4 and 5 and the `complete` die with the worker; its store has the end.
        store.record(key, 5, status="completed", progress=100, result={"rows": 5})
        with store.engine.begin() as conn:  # it ended a minute ago
            conn.execute(sa.update(store.table).values(ended_at=time.time() - 60))
        deadline = time.monotonic() + 15
        for line in lines:  # each read bounded by the client's 10 s
            events.extend(events_of([line]))
            if events and events[-1]["type"] == "complete":
                break
            assert time.monotonic() < deadline, "the stream did not end"
    lost, end = events[3:]
    assert [e["seq"] for e in events[:3]] == [1, 2, 3]
    assert (lost["code"], lost["status"]) == ("history_lost", "completed")
    assert (end["type"], end["status"], end["seq"], end["rows"]) == ("complete", "completed", 6, 5)
