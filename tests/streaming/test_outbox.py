"""Events a worker could not publish wait in its outbox and reach the watchers, in
order, once Redis answers again (README, Faults: Redis paused)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kinora.cli.embedded import EmbeddedRedis
from kinora.streaming import keys
from kinora.streaming.events import parse
from kinora.streaming.logger import SSELogger
from kinora.streaming.outbox import OUTBOX
from tests.utils.processes import wait_for


@pytest.fixture
def paused_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        client = redis.Redis(
            host="127.0.0.1",
            port=server.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            yield server, client
        finally:
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGCONT)
            OUTBOX.clear()
            client.close()


def test_events_published_while_redis_is_paused_arrive_in_order_when_it_is_back(
    paused_redis: tuple[EmbeddedRedis, redis.Redis], video_id: int
) -> None:
    server, client = paused_redis
    assert server.process is not None
    log = SSELogger(keys.video(video_id), client=client, retry_count=1, max_retries=3)
    assert log.log("before the pause") == 1
    os.kill(server.process.pid, signal.SIGSTOP)
    started = time.monotonic()
    assert log.step(5, "Processing video...", progress=40) is None
    # The retry notice above all: the watchers must learn why nothing happens.
    assert log.error("the model timed out", error_code="timeout", is_retryable=True) is None
    # Later events of the video queue behind the first, without a wait of their own.
    assert log.log("after the notice") is None
    assert time.monotonic() - started < 5  # the job was held up seconds, not minutes
    assert len(OUTBOX) == 3
    os.kill(server.process.pid, signal.SIGCONT)
    wait_for("the outbox to drain", lambda: len(OUTBOX) == 0, timeout=10)
    raw: list[bytes] = client.zrange(keys.video(video_id).history, 0, -1)  # type: ignore[assignment]
    events = [parse(r) for r in raw]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["message"] for e in events] == [
        "before the pause",
        "Processing video...",
        "the model timed out",
        "after the notice",
    ]
    assert events[2]["retry_count"] == 1
    assert log.log("and then live again") == 5
