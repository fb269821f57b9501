"""Every way an attempt at a video can go, in-process: `attempt.run` against the
mock engine with no broker (README, How it works), a real Redis and the session's database.

The end-to-end versions of these (tests/worker/test_generation.py) go through a real
Celery worker; these run in milliseconds and on both databases.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, update

from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import CreditEntry, CreditKind, User, Video, VideoStatus, utcnow
from kinora.jobs import store
from kinora.streaming import keys
from kinora.streaming.events import parse
from kinora.worker import attempt, sweeper
from kinora.worker.engines.mock import MockEngine, prompt_key
from kinora.worker.job import worker_identity
from tests.utils.accounts import Account
from tests.utils.processes import wait_for
from tests.utils.rows import video_row

COST = 100
STEP = 0.02  # the mock's pause between progress updates


def new_video(account: Account, prompt: str, **parameters: Any) -> int:
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        video, _ = store.create_video(
            session, user, prompt=prompt, parameters=parameters, cost=COST, task_id="t0"
        )
        return video.id


def run_once(video_id: int, *, task_id: str = "t0", retry: int = 0, max_retries: int = 3) -> Any:
    return attempt.run(
        video_id,
        task_id=task_id,
        retry_count=retry,
        max_retries=max_retries,
        engine=MockEngine(step_seconds=STEP),
    )


def story(client: redis.Redis, video_id: int) -> list[Any]:
    """Every event the video's watchers can replay, in order."""
    raw: list[bytes] = client.zrange(keys.video(video_id).history, 0, -1)  # type: ignore[assignment]
    return [parse(event) for event in raw]


def credits_and_refunds(account: Account) -> tuple[int, int]:
    with session_scope() as session:
        credits = session.scalar(select(User.credits).where(User.id == account.id))
        refunds = session.scalar(
            select(func.count())
            .select_from(CreditEntry)
            .where(CreditEntry.user_id == account.id, CreditEntry.kind == CreditKind.REFUND)
        )
    return int(credits or 0), int(refunds or 0)


def model_jobs(client: redis.Redis, prompt: str) -> int:
    return int(client.zcard(prompt_key(prompt)))


def test_a_video_runs_every_step_to_completed(account: Account, redis_client: redis.Redis) -> None:
    prompt = "A paper boat drifting down a rain gutter"
    video_id = new_video(account, prompt)

    assert run_once(video_id) == {"status": "completed", "video_id": video_id}

    events = story(redis_client, video_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["step"] for e in events if e["type"] == "progress"] == sorted(
        e["step"] for e in events if e["type"] == "progress"
    )
    assert events[-1]["type"] == "complete"
    assert events[-1]["status"] == "completed"
    assert events[-1]["video_url"].startswith(f"/api/v1/videos/{video_id}/content?token=")
    video = video_row(video_id)
    assert video.status == VideoStatus.COMPLETED
    assert video.progress == 100
    assert video.end_seq == events[-1]["seq"]
    assert model_jobs(redis_client, prompt) == 1
    assert credits_and_refunds(account) == (1000 - COST, 0)


def test_a_transient_failure_gives_the_video_back_and_the_retry_resumes_it(
    account: Account, redis_client: redis.Redis
) -> None:
    prompt = "[mock:transient] A lighthouse keeper's cat at dawn"
    video_id = new_video(account, prompt)

    with pytest.raises(attempt.Retry):
        run_once(video_id, retry=0)
    assert video_row(video_id).status == VideoStatus.PENDING  # given back, not failed
    error = [e for e in story(redis_client, video_id) if e["type"] == "error"]
    assert error[-1]["is_retryable"] is True
    assert (error[-1]["retry_count"], error[-1]["max_retries"]) == (0, 3)

    assert run_once(video_id, retry=1)["status"] == "completed"
    assert video_row(video_id).status == VideoStatus.COMPLETED
    assert model_jobs(redis_client, prompt) == 1  # the mock refused the first create
    assert credits_and_refunds(account) == (1000 - COST, 0)


def test_the_last_allowed_retry_failing_is_final_and_refunded(
    account: Account, redis_client: redis.Redis
) -> None:
    video_id = new_video(account, "[mock:transient] The last try of a busy model")

    result = run_once(video_id, retry=3, max_retries=3)

    assert result["status"] == "failed"
    events = story(redis_client, video_id)
    assert events[-2]["type"] == "error"
    assert events[-2]["is_retryable"] is False
    assert (events[-1]["type"], events[-1]["status"]) == ("complete", "failed")
    assert credits_and_refunds(account) == (1000, 1)


def test_a_content_policy_refusal_fails_at_once_and_is_refunded(
    account: Account, redis_client: redis.Redis
) -> None:
    video_id = new_video(account, "[mock:policy] Something the model refuses")

    result = run_once(video_id, retry=0, max_retries=3)

    assert result["status"] == "failed"
    error = next(e for e in story(redis_client, video_id) if e["type"] == "error")
    assert error["is_retryable"] is False
    assert error["error_code"] == "moderation_blocked"
    assert video_row(video_id).status == VideoStatus.FAILED
    assert credits_and_refunds(account) == (1000, 1)


def test_a_stalled_model_job_times_out_without_retry_and_is_refunded(
    account: Account, redis_client: redis.Redis
) -> None:
    video_id = new_video(account, "[mock:stall] A clock that never strikes")
    with session_scope() as session:  # created long enough ago to be 0.3 s from its deadline
        timeout = get_settings().video_timeout_seconds
        session.execute(
            update(Video)
            .where(Video.id == video_id)
            .values(created_at=utcnow() - timedelta(seconds=timeout - 0.3))
        )

    result = run_once(video_id, retry=0, max_retries=3)

    assert result["status"] == "failed"
    error = next(e for e in story(redis_client, video_id) if e["type"] == "error")
    assert error["error_code"] == "timeout"
    assert error["is_retryable"] is False
    assert video_row(video_id).status == VideoStatus.FAILED
    assert credits_and_refunds(account) == (1000, 1)


def test_a_cancel_mid_generation_stops_the_attempt_and_refunds_once(
    account: Account, redis_client: redis.Redis
) -> None:
    prompt = "A kite above a windy hill, cancelled"
    video_id = new_video(account, prompt)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(run_once(video_id)))
    worker.start()
    # Cancel once the model job is running (the attempt is polling it).
    wait_for("the model job", lambda: video_row(video_id).model_job_id, timeout=10)
    with session_scope() as session:
        assert store.cancel(session, video_id)
    worker.join(timeout=30)
    assert not worker.is_alive()

    assert results == [{"status": "abandoned", "video_id": video_id, "video_status": "cancelled"}]
    video = video_row(video_id)
    assert video.status == VideoStatus.CANCELLED
    assert video.file_path is None
    assert credits_and_refunds(account) == (1000, 1)


def test_a_duplicate_delivery_is_skipped_while_the_first_runs(
    account: Account, redis_client: redis.Redis
) -> None:
    prompt = "Two couriers, one parcel"
    video_id = new_video(account, prompt)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(run_once(video_id, task_id="a")))
    first.start()
    wait_for("the claim", lambda: video_row(video_id).status == VideoStatus.PROCESSING, timeout=10)

    assert run_once(video_id, task_id="b") == {"status": "skipped", "video_id": video_id}
    first.join(timeout=30)
    assert results == [{"status": "completed", "video_id": video_id}]
    assert model_jobs(redis_client, prompt) == 1


def test_the_same_task_redelivered_while_its_lease_lives_waits_for_it(
    account: Account, redis_client: redis.Redis
) -> None:
    """A killed pool process leaves its claim; Celery hands the very same task back at
    once. It must wait out the lease, not be skipped as a duplicate."""
    video_id = new_video(account, "A task that comes back too soon")
    with session_scope() as session:
        owner = worker_identity("same-task")
        assert store.claim(session, video_id, owner, lease_seconds=30)

    with pytest.raises(attempt.WaitForLease) as waiting:
        run_once(video_id, task_id="same-task")
    assert 25 < waiting.value.seconds <= 30
    assert story(redis_client, video_id)[-1]["message"].startswith(
        "Its worker stopped answering: resuming in"
    )


def test_a_finished_model_job_is_delivered_though_its_deadline_passed_while_it_waited(
    account: Account, redis_client: redis.Redis
) -> None:
    """README, Faults: the worker died after the model accepted the job; the model finished
    it; the claim's lease ran out and the deadline passed before another worker took the
    video over. The sweeps leave it to that worker, which looks at the model's job first
    and delivers it: completed, charged once, nothing refunded, no second model job."""
    prompt = "A lighthouse keeper winding the clockwork at dusk"
    video_id = new_video(account, prompt)
    engine = MockEngine(step_seconds=STEP)
    job = engine.create(prompt=prompt, seconds=4, size="1280x720")
    wait_for("the model job to finish", lambda: engine.retrieve(job.id).status == "completed", 10)
    timeout = get_settings().video_timeout_seconds
    with session_scope() as session:  # what a worker killed after set_model_job leaves
        session.execute(
            update(Video)
            .where(Video.id == video_id)
            .values(
                status=VideoStatus.PROCESSING, claimed_by="dead-worker", attempts=1,
                lease_expires_at=utcnow() - timedelta(seconds=1), model_job_id=job.id,
                model_submitted_at=utcnow() - timedelta(seconds=timeout + 30),
                created_at=utcnow() - timedelta(seconds=timeout + 30),
            )
        )  # fmt: skip

    found = sweeper.sweep_once()
    assert video_id not in found.timed_out
    if video_id in found.requeue:
        assert run_once(video_id, retry=0) == {"status": "completed", "video_id": video_id}
    else:
        # The PostgreSQL pass shares its database with a running stack, whose worker
        # sweeps every second: its sweep took the video over first and queued it to
        # that worker. The promise is the same: delivered, not timed out.
        wait_for(
            "the stack's worker to deliver it",
            lambda: video_row(video_id).status in (VideoStatus.COMPLETED, VideoStatus.FAILED),
            30,
        )

    assert video_row(video_id).status == VideoStatus.COMPLETED
    assert credits_and_refunds(account) == (900, 0)
    assert model_jobs(redis_client, prompt) == 1
    assert story(redis_client, video_id)[-1]["status"] == "completed"
