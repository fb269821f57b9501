"""SSELogger against a real Redis: seq, history, retention, errors, Redis down."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import REGISTRY

from kinora.streaming import keys
from kinora.streaming.events import encode_body, parse
from kinora.streaming.logger import SSELogger
from kinora.streaming.outbox import OUTBOX
from tests.utils.settings import reset_caches


def history(client: redis.Redis, video_id: int) -> list[dict[str, object]]:
    raw: list[bytes] = client.zrange(keys.video(video_id).history, 0, -1)  # type: ignore[assignment]
    return [dict(parse(r)) for r in raw]


def test_each_call_is_one_event_with_the_next_seq(redis_client: redis.Redis, video_id: int) -> None:
    with SSELogger(keys.video(video_id)) as log:
        log.step(1, "Validating request parameters...", progress=3)
        log.stage("generating")
        log.step(5, "Processing video...", progress=58)
        log.step(5, "late report", progress=40)  # progress never goes backwards
        log.complete(video_url="/v.mp4")

    events = history(redis_client, video_id)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["id"] for e in events] == ["1", "2", "3", "4", "5"]
    assert [e["type"] for e in events] == ["progress", "stage", "progress", "progress", "complete"]
    assert [e.get("progress") for e in events] == [3, 3, 58, 58, 100]
    assert events[1]["previous_stage"] is None
    assert events[-1]["video_url"] == "/v.mp4"
    assert all(str(e["timestamp"]).endswith("Z") for e in events)


def test_history_expires_after_the_retention(redis_client: redis.Redis, video_id: int) -> None:
    with SSELogger(keys.video(video_id)) as log:
        log.log("hello")
    assert 86000 < redis_client.ttl(keys.video(video_id).history) <= 86400
    assert 86000 < redis_client.ttl(keys.video(video_id).seq) <= 86400


def test_history_is_capped(
    redis_client: redis.Redis, video_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENT_HISTORY_MAX", "10")
    reset_caches()
    try:
        with SSELogger(keys.video(video_id)) as log:
            for i in range(25):
                log.log(f"event {i}")
    finally:
        monkeypatch.delenv("EVENT_HISTORY_MAX")
        reset_caches()
    assert [e["seq"] for e in history(redis_client, video_id)] == list(range(16, 26))


def test_every_redis_structure_of_a_video_is_bounded_like_its_history(
    redis_client: redis.Redis, video_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Faults: 1,000 events with a cap of 50 leave no structure of the video with
    more than 50 entries, each with its retention set; and the newest events' resends
    are still recognised (not published twice)."""
    monkeypatch.setenv("EVENT_HISTORY_MAX", "50")
    reset_caches()
    try:
        log = SSELogger(keys.video(video_id))
        for i in range(1000):
            log.log(f"event {i}")
        sizes = {}
        for name in redis_client.scan_iter(match=f"*video:{video_id}*"):
            kind = str(redis_client.type(name), "ascii")  # type: ignore[arg-type]
            size = {"zset": redis_client.zcard, "hash": redis_client.hlen}.get(kind)
            sizes[name.decode()] = size(name) if size else 1
            assert redis_client.ttl(name) > 0, name
        body = encode_body(log.key, "log", "once", {})
        assert log._send("log", body, False, "resent-id") == 1001
        assert log._send("log", body, False, "resent-id") == 1001  # a resend: the same seq
    finally:
        monkeypatch.delenv("EVENT_HISTORY_MAX")
        reset_caches()
    assert max(sizes.values()) <= 50, sizes
    assert len(history(redis_client, video_id)) == 50


def test_an_exception_leaving_the_block_is_published_then_propagates(
    redis_client: redis.Redis, video_id: int
) -> None:
    def job() -> None:
        with SSELogger(keys.video(video_id)) as log:
            log.step(1, "Validating request parameters...", progress=3)
            raise ValueError("bad frame")

    with pytest.raises(ValueError, match="bad frame"):
        job()

    error, complete = history(redis_client, video_id)[1:]
    assert error["type"] == "error"
    assert error["message"] == "bad frame"
    assert error["error_code"] == "ValueError"
    assert (error["retry_count"], error["max_retries"], error["is_retryable"]) == (0, 0, False)
    assert complete["type"] == "complete"
    assert complete["status"] == "failed"


def test_a_retried_failure_is_not_final(redis_client: redis.Redis, video_id: int) -> None:
    with (
        pytest.raises(ConnectionError),
        SSELogger(keys.video(video_id), retry_count=1, max_retries=3, will_retry=lambda _e: True),
    ):
        raise ConnectionError("model unreachable")
    (error,) = history(redis_client, video_id)
    assert error["is_retryable"] is True
    assert error["retry_count"] == 1
    assert error["max_retries"] == 3  # and no complete event: a retry follows


def test_publishing_never_breaks_the_task_when_redis_is_down(video_id: int) -> None:
    down = "redis://127.0.0.1:1"  # nothing listens: the worker's own client to it fails
    failed_before = not_published()
    with SSELogger(keys.video(video_id), redis_url=down) as log:
        assert log.step(1, "Validating request parameters...", progress=3) is None
        assert log.complete() is None
    assert not_published() == failed_before + 2  # counted in /metrics
    assert OUTBOX.clear() == 2  # kept for when Redis is back (tests/streaming/test_outbox.py)


def not_published() -> float:
    return REGISTRY.get_sample_value("kinora_events_publish_failures_total") or 0.0
