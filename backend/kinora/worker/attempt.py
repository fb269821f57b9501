"""One attempt at a video (README, How it works): claim it, run its steps, and decide what a
failure means, with jobs.errors.RetryPolicy.

An attempt that fails for a reason worth retrying gives the video back (pending, its
model job id kept) and raises `Retry`; the task schedules the next attempt, which
resumes the model job rather than paying for another. A failure that is final fails
and refunds the video. A video taken from this worker meanwhile (cancelled, timed
out, taken over) is left to whoever took it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from kinora.core import logs
from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import Video
from kinora.jobs import dispatch, event_floor, store, webhooks
from kinora.jobs.errors import RetryPolicy
from kinora.jobs.lifecycle import Step, VideoParameters
from kinora.streaming.events import describe_error
from kinora.streaming.logger import SSELogger
from kinora.worker import handback
from kinora.worker.engines import VideoEngine, get_engine
from kinora.worker.engines.timed import TimedEngine
from kinora.worker.job import Job, JobLost, worker_identity
from kinora.worker.lease import Lease
from kinora.worker.steps import Generation

log = logging.getLogger(__name__)


class Retry(Exception):
    """This attempt failed in a way worth retrying; the video is pending again."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe_error(cause))
        self.cause = cause


class WaitForLease(Exception):
    """This very task's message came back while the claim of its earlier delivery is
    still live: the worker that ran it died (a pool process killed, Celery requeues the
    message at once). Come back when that lease has run out, rather than be dropped as a
    duplicate and leave the video to the sweeper."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the claim of an earlier delivery runs {seconds:.1f} s more")
        self.seconds = seconds


def _claim(video_id: int, owner: str) -> Job | None:
    settings = get_settings()
    with session_scope() as session:
        if not store.claim(session, video_id, owner, settings.lease_seconds):
            return None
        video = session.get(Video, video_id, populate_existing=True)
        assert video is not None  # just claimed
        return Job(
            video_id=video_id,
            user_id=video.user_id,
            owner=owner,
            prompt=video.prompt,
            params=VideoParameters.of(video.parameters),
            deadline=video.created_at + timedelta(seconds=settings.video_timeout_seconds),
            progress=video.progress,
            model_job_id=video.model_job_id,
            model_submitted_at=video.model_submitted_at,
            attempt=video.attempts,
            last_seq=video.last_seq,
        )


def run(
    video_id: int,
    *,
    task_id: str,
    retry_count: int = 0,
    max_retries: int = 0,
    engine: VideoEngine | None = None,
) -> dict[str, Any]:
    """One attempt at a video, unless someone else holds it. Returns the task's result,
    or raises `Retry` when the task should try again later."""
    policy = RetryPolicy(max_retries, get_settings().retry_countdown_seconds)
    owner = worker_identity(task_id)
    job = _claim(video_id, owner)
    if job is None:
        with session_scope() as session:
            left = store.lease_left(session, video_id, f":{task_id}")
        if left is not None:
            log.info("video %s: this task's earlier delivery holds it %.1f s more", video_id, left)
            event_floor.video_logger(video_id).log(
                f"Its worker stopped answering: resuming in {left:.0f} s"
            )
            raise WaitForLease(left)
        log.info("video %s is not pending: skipped (duplicate delivery)", video_id)
        return {"status": "skipped", "video_id": video_id}
    events = event_floor.video_logger(
        video_id,
        retry_count=retry_count,
        max_retries=max_retries,
        will_retry=lambda exc: policy.will_retry(exc, retry_count),
        retry_in=policy.countdown_seconds,
        last_seq=job.last_seq,
        on_complete=event_floor.end_recorder(video_id),
    )
    events.progress = job.progress
    events.stage_name = Step.QUEUED.stage  # opened by the API with step 0
    log.info(
        "video %s claimed: attempt %d%s", video_id, job.attempt,
        f", resuming model job {job.model_job_id}" if job.model_job_id else "",
    )  # fmt: skip
    if job.attempt == 1:
        webhooks.notify(video_id, "started")
    try:
        with Lease(job) as lease, events:
            try:
                Generation(job, TimedEngine(engine or get_engine()), events, lease).run()
            except (JobLost, handback.HandBack):
                raise
            except Exception as exc:
                # The database first, so a client that reads the events (published by
                # the logger as the exception leaves the block) finds the same story.
                with session_scope() as session:
                    if policy.will_retry(exc, retry_count):
                        ours = store.release(session, video_id, owner)
                    else:
                        ours = store.fail(session, video_id, describe_error(exc), owner=owner)
                if not ours:  # ended meanwhile (cancelled, timed out by the sweeper)
                    raise JobLost(video_id) from exc
                raise
    except handback.HandBack:
        return _hand_back(job, events)
    except JobLost:
        status = _status(video_id)
        log.info("video %s was taken from this worker (now %s); stopped", video_id, status)
        return {"status": "abandoned", "video_id": video_id, "video_status": status}
    except Exception as exc:
        if policy.will_retry(exc, retry_count):
            raise Retry(exc) from exc
        log.warning("video %s failed: %s", video_id, describe_error(exc))
        webhooks.notify(video_id, "failed")
        return {"status": "failed", "video_id": video_id, "error": describe_error(exc)}
    log.info("video %s completed", video_id)
    webhooks.notify(video_id, "completed")
    return {"status": "completed", "video_id": video_id}


def _hand_back(job: Job, events: SSELogger) -> dict[str, Any]:
    """Give the video back to the queue: pending again (its model job id kept), and a
    new message for another worker. If it was cancelled meanwhile, nothing to do."""
    with session_scope() as session:
        ours = store.release(session, job.video_id, job.owner)
    if ours:
        events.log("This worker is shutting down: the video goes back to the queue")
        dispatch.generate_video(job.video_id, trace_id=logs.current_trace_id())
        log.info("video %s handed back to the queue (worker shutting down)", job.video_id)
    return {"status": "handed_back", "video_id": job.video_id}


def _status(video_id: int) -> str | None:
    with session_scope() as session:
        video = session.get(Video, video_id)
        return str(video.status) if video else None
