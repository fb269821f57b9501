"""When Redis loses a video's events (README, Faults): `seq` never goes backwards or
repeats, a stream that asks for lost events is told so (`history_lost`, with the state
from the database) instead of going silent, every stream ends with the outcome the
database has, `204` only for a client that has the `complete`, and nothing is ever
published after a video's `complete`."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import update

from kinora.core.db import session_scope
from kinora.core.models import Video, utcnow
from kinora.jobs import event_floor
from kinora.jobs.lifecycle import Step
from kinora.streaming import keys
from kinora.streaming.events import SEQ_JUMP_AFTER_LOSS
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import Follower, events_of, read_stream, submit
from tests.utils.processes import Stack, wait_for


def forget(client: redis.Redis, video_id: int) -> None:
    """What a FLUSHALL, a failover to an empty replica or an old snapshot does to one
    video (the shared test Redis also carries the stack's queue, so not all of it)."""
    client.delete(
        keys.video(video_id).seq,
        keys.video(video_id).history,
        keys.video(video_id).end,
        keys.video(video_id).sent,
    )


def test_nothing_is_published_after_complete(redis_client: redis.Redis, video_id: int) -> None:
    worker = SSELogger(keys.video(video_id))
    worker.step(5, "Processing video...", progress=50)
    canceller = SSELogger(keys.video(video_id))  # another process: the API cancelling
    assert canceller.complete(status="cancelled") == 2
    # The worker's next step, a late stage change, a second complete: all refused.
    assert worker.step(6, "Downloading video...", progress=88) is None
    assert worker.stage("finalizing") is None
    assert SSELogger(keys.video(video_id)).complete() is None
    raw: list[bytes] = redis_client.zrange(keys.video(video_id).history, 0, -1)  # type: ignore[assignment]
    assert len(raw) == 2
    assert b'"status":"cancelled"' in raw[-1]


def test_seq_continues_above_the_floor_when_redis_lost_the_counter(
    redis_client: redis.Redis, video_id: int
) -> None:
    log = SSELogger(keys.video(video_id))
    for i in range(8):
        log.log(f"event {i}")
    forget(redis_client, video_id)
    # The same logger knows its last seq; a new one (another process) is given the floor
    # the database recorded, which may lag by a few events.
    assert log.log("after the loss") == 8 + SEQ_JUMP_AFTER_LOSS
    assert (
        SSELogger(keys.video(video_id), last_seq=5).log("from elsewhere") == 9 + SEQ_JUMP_AFTER_LOSS
    )
    forget(redis_client, video_id)
    assert (
        SSELogger(keys.video(video_id), last_seq=5).log("lagging floor") == 5 + SEQ_JUMP_AFTER_LOSS
    )
    # With the counter present the floor only guards: the counter goes on.
    assert SSELogger(keys.video(video_id), last_seq=3).log("next") == 6 + SEQ_JUMP_AFTER_LOSS


@pytest.mark.slow
def test_a_live_watcher_is_told_of_the_loss_and_still_reaches_the_outcome(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    created = submit(stack, account, "[mock:stall] A clock tower whose hands never move")
    video = created["video_id"]
    watcher = Follower([stack.base_url], video, account.token)
    watcher.start()
    # Up to the model's first progress: a stalled model's job publishes nothing after it
    # (an event still to come would meet the loss before the cancel does, and its
    # notice would rightly say `processing`).
    wait_for(
        "the model job to run",
        lambda: any(e.get("step") == Step.PROCESSING for e in watcher.events),
        timeout=30,
    )
    seen = watcher.events[-1]["seq"]
    forget(redis_client, video)
    with stack.client(account) as client:
        assert client.post(f"/api/v1/videos/{video}/cancel").status_code == 200
    watcher.join(30)
    assert not watcher.is_alive()
    assert watcher.error is None, repr(watcher.error)
    events = watcher.events
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs  # strictly increasing: none repeats
    gaps = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
    lost = [e for e in events if e.get("code") == "history_lost"]
    # Every gap is announced by the notice that closes it.
    assert len(gaps) == len(lost) == 1
    assert lost[0]["seq"] == gaps[0][1]
    assert lost[0]["seq"] > seen
    assert lost[0]["status"] == "cancelled"
    assert events[-1]["type"] == "complete"
    assert events[-1]["status"] == "cancelled"
    assert events[-1]["seq"] > seen + SEQ_JUMP_AFTER_LOSS - 10
    # A reconnect with the complete's id is a 204; one from before the loss gets the
    # notice and the outcome again.
    headers = {"Authorization": f"Bearer {account.token}"}
    url = f"{stack.base_url}/api/v1/videos/{video}/stream"
    done = httpx.get(url, headers={**headers, "Last-Event-ID": events[-1]["id"]}, timeout=10)
    assert done.status_code == 204
    status, lines = read_stream(url, headers={**headers, "Last-Event-ID": str(seen)})
    again = events_of(lines)
    assert status == 200
    assert [e.get("code") for e in again[:-1]] == ["history_lost"]
    assert again[-1] == events[-1]


@pytest.mark.slow
def test_an_ended_video_whose_events_are_gone_still_tells_its_outcome(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    created = submit(stack, account, "A field of sunflowers turning to the sun")
    status, lines = read_stream(created["stream_url"])
    whole = events_of(lines)
    assert whole[-1]["status"] == "completed"
    video = created["video_id"]
    # The database records where the events end (just after the worker publishes it).
    wait_for("the end recorded", lambda: event_floor.floor(video) == whole[-1]["seq"], timeout=10)
    forget(redis_client, video)

    headers = {"Authorization": f"Bearer {account.token}"}
    url = f"{stack.base_url}/api/v1/videos/{video}/stream"
    # A client that has seen the complete: 204, though Redis forgot it.
    done = httpx.get(url, headers={**headers, "Last-Event-ID": whole[-1]["id"]}, timeout=10)
    assert done.status_code == 204
    # A client that saw nothing, or half: the notice with the state, then the outcome
    # at the seq it had, with a URL that plays.
    for after in (0, 5):
        status, lines = read_stream(url, headers={**headers, "Last-Event-ID": str(after)})
        got: list[dict[str, Any]] = events_of(lines)
        assert status == 200
        assert [e["type"] for e in got] == ["log", "complete"]
        assert got[0]["code"] == "history_lost"
        assert got[0]["status"] == "completed"
        assert got[0]["progress"] == 100
        assert got[1]["seq"] == whole[-1]["seq"]
        assert got[1]["status"] == "completed"
        played = httpx.get(got[1]["video_url"], timeout=10)
        assert played.status_code == 200
        assert played.headers["content-type"] == "video/mp4"


@pytest.mark.slow
def test_a_video_that_ended_while_redis_was_down_gets_its_complete_published_later(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    """The API cancelled the video but could not publish its end (simulated: the end
    is deleted, and the database's record with it). A later stream rebuilds it."""
    created = submit(stack, account, "[mock:stall] A kite stuck in a tree")
    video = created["video_id"]
    wait_for("the model job", lambda: event_floor.floor(video) >= 4, timeout=30)  # steps recorded
    with stack.client(account) as client:
        assert client.post(f"/api/v1/videos/{video}/cancel").status_code == 200
    before = event_floor.floor(video)
    forget(redis_client, video)
    with session_scope() as session:
        session.execute(
            update(Video)
            .where(Video.id == video)
            .values(end_seq=None, completed_at=utcnow() - timedelta(minutes=1))
        )
        session.commit()
    status, lines = read_stream(created["stream_url"])
    got = events_of(lines)
    assert status == 200
    assert got[-1]["type"] == "complete"
    assert got[-1]["status"] == "cancelled"
    assert got[-1]["seq"] > before  # above every seq used before
    assert event_floor.floor(video) == got[-1]["seq"]  # and recorded as the end
    headers = {"Last-Event-ID": got[-1]["id"]}
    assert httpx.get(created["stream_url"], headers=headers, timeout=10).status_code == 204
