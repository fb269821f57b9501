"""Redis that fails over (README, Deployment: Redis topologies): REDIS_URL in its
Sentinel form, `redis+sentinel://host:port,…/<service>`, against a real primary, replica
and three Sentinels (Debian's Redis 7). A library host with a store follows a job
through the primary's SIGKILL; Celery queues over the same URL (kombu's Sentinel
transport) before and after it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from kinora.jobs import dispatch
from kinora.streaming import SQLStore, SSELogger, progress_router
from tests.faults.chaos import Watcher, seq_problems
from tests.utils.clients import events_of, read_stream
from tests.utils.sentinel import SentinelSet
from tests.utils.servers import serve
from tests.utils.tls import TlsRedis

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    found = SentinelSet(tmp_path / "redis").start()
    try:
        yield found
    finally:
        found.stop()


def queue_round_trip(url: str, body: dict[str, int]) -> dict[str, int]:
    app = dispatch.make_celery(url, results=False)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=10, interval_start=0.2, interval_step=0.2)
            queue = conn.SimpleQueue(f"sentinel-{time.monotonic_ns()}")
            queue.put(body)
            message = queue.get(timeout=10)
            message.ack()
            queue.close()
            got: dict[str, int] = message.payload
            return got
    finally:
        app.close()


def test_a_job_and_the_queue_go_on_through_a_failover(
    sentinel: SentinelSet, tmp_path: Path, environment: dict[str, str]
) -> None:
    assert queue_round_trip(sentinel.url, {"before": 1}) == {"before": 1}
    store = SQLStore(f"sqlite:///{tmp_path / 'host.db'}")
    app = FastAPI(title="not Kinora")
    router = progress_router(authorize=lambda r, j: True, redis_url=sentinel.url, store=store)
    app.include_router(router, prefix="/progress")
    job = f"render-{time.monotonic_ns()}"
    log = SSELogger(job, kind="job", redis_url=sentinel.url, store=store)
    with serve(app) as base:
        watcher = Watcher(base, 0, "", time.monotonic() + 60, url=f"{base}/progress/{job}/stream")
        for i in range(1, 6):
            log.update(i, 10)
        watcher.start()
        time.sleep(0.5)
        took = sentinel.fail_over()
        print(f"the Sentinels named a new primary {took:.1f} s after the SIGKILL")
        for i in range(6, 11):
            log.update(i, 10)
            time.sleep(0.1)
        log.complete()
        watcher.join(45)
    store.engine.dispose()
    assert not watcher.problems, watcher.problems
    assert not seq_problems(watcher.events), watcher.events
    assert watcher.events[-1]["status"] == "completed"
    progress = [e["progress"] for e in watcher.events if e["type"] == "progress"]
    assert progress == sorted(progress)
    assert 100 in progress  # the events after the failover arrived
    assert queue_round_trip(sentinel.url, {"after": 2}) == {"after": 2}


def test_tls_with_an_acl_user_for_the_events_and_the_queue(
    tmp_path: Path, environment: dict[str, str]
) -> None:
    """`rediss://user:password@…?ssl_cert_reqs=required&ssl_ca_certs=…`: a server that
    speaks TLS only and refuses its default user."""
    server = TlsRedis(tmp_path / "tls").start()
    try:
        assert queue_round_trip(server.url, {"tls": 1}) == {"tls": 1}
        app = FastAPI(title="not Kinora")
        app.include_router(
            progress_router(authorize=lambda r, j: True, redis_url=server.url), prefix="/p"
        )
        job = f"tls-{time.monotonic_ns()}"
        with serve(app) as base:
            with SSELogger(job, kind="job", redis_url=server.url) as log:
                log.update(1, 2)
                log.update(2, 2)
                log.complete()
            status, lines = read_stream(f"{base}/p/{job}/stream", timeout=10)
        assert status == 200
        assert [e["seq"] for e in events_of(lines)] == [1, 2, 3]
    finally:
        server.stop()
