"""Submitting and cancelling a video: the service behind the API's routes, which map
its outcomes to statuses. Each database step is its own short transaction (committed
by `session_scope`), run in a thread by the caller; the events go through the API's
own async Redis client.

A submit is: answer a retried Idempotency-Key from its record; charge and create the
video in one transaction; publish step 0 (so it is always the video's first event);
queue the task by name. If Redis goes away between the charge and the queue, the
video fails, is refunded and its key is freed for the retry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
import kombu.exceptions
import redis
import redis.asyncio as aioredis

from kinora.core import logs
from kinora.core.db import session_scope
from kinora.core.models import User, Video
from kinora.jobs import dispatch, event_floor, idempotency, store, webhooks
from kinora.jobs.lifecycle import PROGRESS, Step, VideoParameters
from kinora.streaming import keys
from kinora.streaming.events import Outcome, ending, publish_async
from kinora.streaming.keys import StreamKey

log = logging.getLogger(__name__)
T = TypeVar("T")


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The database and the broker are synchronous: off the event loop."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))


class QueueUnreachable(Exception):
    """The video was charged but could not be queued: it failed and was refunded."""


@dataclass(frozen=True)
class Submitted:
    video_id: int
    user_id: int
    task_id: str
    credits_remaining: int
    replayed: bool = False

    @classmethod
    def of(cls, replay: idempotency.Replay, user_id: int) -> Submitted:
        return cls(replay.video_id, user_id, replay.task_id, replay.credits_remaining, True)


def lookup(user_id: int, key: str, digest: str) -> Submitted | None:
    """The earlier answer to this Idempotency-Key, if any (idempotency.KeyReused if the
    key came with another body)."""
    with session_scope() as session:
        replay = idempotency.lookup(session, user_id, key, digest)
    return Submitted.of(replay, user_id) if replay is not None else None


def create(
    user_id: int,
    prompt: str,
    parameters: VideoParameters,
    cost: int,
    key: str | None,
    digest: str,
    webhook: tuple[str, list[str]] | None = None,
) -> Submitted:
    """Charge and create in one transaction (store.InsufficientCredits when the balance
    is short). A key another request holds meanwhile answers with that request's video."""
    task_id = str(uuid.uuid4())
    try:
        with session_scope() as session:
            user = session.get(User, user_id)
            assert user is not None  # authenticated in this request
            video, remaining = store.create_video(
                session,
                user,
                prompt=prompt,
                parameters=parameters.as_json(),
                cost=cost,
                task_id=task_id,
                idempotency_key=key,
                request_hash=digest,
                webhook=webhook,
            )
            return Submitted(video.id, user_id, task_id, remaining)
    except idempotency.KeyTaken:
        assert key is not None
        with session_scope() as session:
            return Submitted.of(idempotency.replay(session, user_id, key, digest), user_id)


def announcements(user_id: int) -> StreamKey:
    """Where a user's new videos are announced: each event names one in `job`."""
    return keys.of("submitted", user_id)


async def start(client: aioredis.Redis, submitted: Submitted) -> None:
    """Step 0, then the task. QueueUnreachable (refunded) if Redis is gone."""
    queued = Step.QUEUED
    key = keys.video(submitted.video_id)
    try:
        await publish_async(
            client, key, "stage", f"Stage: {queued.stage}", stage=queued.stage,
            previous_stage=None, progress=PROGRESS[queued], status="pending",
            retention=event_floor.retention(),
        )  # fmt: skip
        await publish_async(
            client, key, "progress", "Video queued",
            step=queued, progress=PROGRESS[queued], status="pending",
            retention=event_floor.retention(),
        )  # fmt: skip
        # Its owner's streams of "all my videos" take it in (docs/protocol.md §6).
        await publish_async(
            client, announcements(submitted.user_id), "log", "video submitted",
            job=submitted.video_id, retention=event_floor.retention(),
        )  # fmt: skip
        await in_thread(
            dispatch.generate_video,
            submitted.video_id,
            trace_id=logs.current_trace_id(),
            task_id=submitted.task_id,
        )
    except (redis.RedisError, kombu.exceptions.OperationalError, OSError) as exc:
        # The event store or the broker is unreachable: the video is refunded and the
        # caller told to try again (503). Anything else is a bug: it propagates (a 500
        # with its trace id and a log line); the video stays pending and charged, and
        # the sweeper queues it again.
        log.exception("could not queue video %s", submitted.video_id)
        video = await in_thread(_fail_unqueued, submitted.video_id, str(exc))
        await publish_end(client, video, "failed", "the job queue is unreachable")
        await in_thread(webhooks.notify, video.id, "failed")
        raise QueueUnreachable(str(exc)) from exc


def _fail_unqueued(video_id: int, reason: str) -> Video:
    with session_scope() as session:
        store.fail(session, video_id, f"could not queue the job: {reason}")
        idempotency.forget(session, video_id)
        video = session.get(Video, video_id)
        assert video is not None
        session.flush()
        session.expunge(video)
        return video


async def cancel(client: aioredis.Redis, video: Video) -> bool:
    """Cancel and refund (one transaction), tell the watchers. False if the video had
    already ended. Its message, if still queued, is not revoked: the worker that
    takes it finds the video cancelled and cannot claim it (a claim needs a pending
    video), and a running attempt notices between steps that its claim is gone. (A
    revoke is a broadcast on a connection of its own, which the API does not keep.)"""
    if not await in_thread(_cancel, video.id):
        return False
    await publish_end(client, video, "cancelled", "its credits were refunded")
    await in_thread(webhooks.notify, video.id, "cancelled")
    return True


def _cancel(video_id: int) -> bool:
    with session_scope() as session:
        return store.cancel(session, video_id)


async def publish_end(
    client: aioredis.Redis, video: Video, status: Outcome, reason: str | None = None
) -> None:
    """The `complete` of a video the API ended, recorded as its end. The database has
    the outcome already: if Redis is unreachable now, a stream publishes the end later
    from it (api.stream.find_end), so this never fails the request."""
    try:
        key = keys.video(video.id)
        message, fields = ending(key, status, reason=reason)
        seq = await publish_async(
            client, key, "complete", message,
            floor=video.last_seq, retention=event_floor.retention(), **fields,
        )  # fmt: skip
    except redis.RedisError as exc:
        log.warning("the end of video %s not published: %s", video.id, exc)
        return
    if seq is not None:
        await in_thread(event_floor.record, video.id, seq, end=True)
