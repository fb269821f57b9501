"""The database rules of a job, and a duplicate delivery through the real worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import select

from kinora.core.db import session_scope
from kinora.core.models import CreditEntry, CreditKind, User, Video, VideoStatus
from kinora.jobs import store
from kinora.jobs.errors import PolicyRefusal, RetryPolicy, TransientEngineError, VideoTimeout
from kinora.jobs.reference import BadReference
from kinora.worker.engines.mock import job_key
from tests.utils.accounts import Account, make_account
from tests.utils.processes import Stack


def new_video(account: Account, prompt: str = "A quiet harbour at dawn", cost: int = 100) -> int:
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        video, _ = store.create_video(
            session, user, prompt=prompt, parameters={}, cost=cost, task_id="t"
        )
    return video.id


def credits_of(account: Account) -> int:
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        return user.credits


def test_claim_succeeds_for_exactly_one_of_many(account: Account) -> None:
    video_id = new_video(account)

    def claim(i: int) -> bool:
        with session_scope() as session:
            return store.claim(session, video_id, f"worker-{i}", 60)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(claim, range(16)))
    assert results.count(True) == 1


def test_a_hold_blocks_other_holders_until_it_runs_out_and_the_sweep_requeues_it(
    account: Account,
) -> None:
    """A worker that received a video's message holds it; a duplicate message's worker
    cannot; the claim replaces the hold; a hold nobody renews is swept and queued."""
    held, claimed, dropped = new_video(account), new_video(account), new_video(account)

    def sweep() -> list[int]:
        with session_scope() as session:
            found = store.sweep(session, video_timeout=3600, stale_pending=3600).requeue
        return [v for v in found if v in (held, claimed, dropped)]

    with session_scope() as session:
        assert store.hold(session, held, "host:1:held", 60)
        assert not store.hold(session, held, "host:2:held", 60)  # a live hold
        assert store.hold(session, claimed, "host:1:held", 60)
        assert store.claim(session, claimed, "host:11:task", 60)  # its pool process starts it
        assert store.hold(session, dropped, "host:1:held", 60)
        mine = {held, claimed, dropped}  # the messages the worker has
        assert store.renew_holds(session, "host:1:held", 0.01, mine) == 2  # not the claimed one
        assert store.drop_holds(session, "host:1:held") == 2  # the worker stops
        assert store.hold(session, held, "host:1:held", 0.01)  # the worker dies now
    time.sleep(0.05)
    assert sweep() == [held]
    assert sweep() == []  # queued again once
    with session_scope() as session:
        assert store.hold(session, held, "host:2:held", 60)  # the new message's worker


def test_a_hold_whose_message_the_worker_forgot_runs_out_and_is_queued_again(
    account: Account,
) -> None:
    """When its broker connection breaks (a failover), Celery forgets the messages a
    worker had received and not started; the worker renews only the holds of the
    messages it still has, so a forgotten one runs out and the sweep queues its video
    (before, the hold was renewed for as long as the worker lived: the video waited)."""
    kept, forgotten = new_video(account), new_video(account)
    with session_scope() as session:
        assert store.hold(session, kept, "host:3:held", 0.05)
        assert store.hold(session, forgotten, "host:3:held", 0.05)
        assert store.renew_holds(session, "host:3:held", 60, {kept}) == 1
    time.sleep(0.1)
    with session_scope() as session:
        found = store.sweep(session, video_timeout=3600, stale_pending=3600).requeue
    assert forgotten in found
    assert kept not in found


def test_concurrent_charges_never_overdraw(environment: dict[str, str]) -> None:
    account = make_account(credits=500)

    def charge(_i: int) -> bool:
        try:
            new_video(account)
        except store.InsufficientCredits:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(charge, range(12)))
    assert results.count(True) == 5
    assert credits_of(account) == 0


def test_a_failed_video_is_refunded_exactly_once(account: Account) -> None:
    video_id = new_video(account)
    assert credits_of(account) == 900

    def fail(_i: int) -> bool:
        with session_scope() as session:
            return store.fail(session, video_id, "model exploded")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(fail, range(8)))
    assert results.count(True) == 1
    assert credits_of(account) == 1000
    with session_scope() as session:
        refunds = session.scalars(
            select(CreditEntry).where(
                CreditEntry.video_id == video_id, CreditEntry.kind == CreditKind.REFUND
            )
        ).all()
        video = session.get(Video, video_id)
        assert video is not None
        assert video.status == VideoStatus.FAILED
    assert [r.amount for r in refunds] == [100]


@pytest.mark.slow
def test_the_same_task_delivered_twice_generates_one_video(
    stack: Stack, account: Account, redis_client: redis.Redis
) -> None:
    from kinora.worker.tasks import generate_video

    prompt = f"Duplicate delivery check {account.email}"
    video_id = new_video(account, prompt)
    first = generate_video.apply_async(args=[video_id])
    second = generate_video.apply_async(args=[video_id])  # a redelivery of the same job
    results = sorted([first.get(timeout=60)["status"], second.get(timeout=60)["status"]])

    assert results == ["completed", "skipped"]
    created = [
        key
        for key in redis_client.scan_iter(match=job_key("*"))
        if redis_client.hget(key, "prompt") == prompt.encode()
    ]
    assert len(created) == 1  # one paid model job
    with session_scope() as session:
        video = session.get(Video, video_id)
        assert video is not None
        assert video.status == VideoStatus.COMPLETED
        assert video.attempts == 1
    assert credits_of(account) == 900  # charged once


def test_the_retry_policy_retries_transient_and_unknown_failures_only() -> None:
    """README, How it works, decided in one place (store.errors.RetryPolicy)."""
    policy = RetryPolicy(max_retries=3, countdown_seconds=60)
    transient = TransientEngineError("the model service is unavailable")
    assert policy.will_retry(transient, 0)
    assert policy.will_retry(RuntimeError("a bug we did not foresee"), 2)
    assert not policy.will_retry(transient, 3)  # the last allowed attempt failed
    assert not policy.will_retry(PolicyRefusal("refused"), 0)
    assert not policy.will_retry(VideoTimeout(1200), 0)
    assert not policy.will_retry(BadReference("not an image"), 0)
