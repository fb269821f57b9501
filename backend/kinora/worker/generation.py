"""The steps of one video's generation (CONTRACT §4, §7), talking to an engine and an
SSELogger.

Three stages: preparing (steps 0-2, progress 0-10), generating (3-5, 10-85) and
finalizing (6-9, 85-100). Step 0 (queued) is published by the API when it queues
the job; the worker carries on from step 1. The database decides what happens
(`jobs`), the logger says what happened; this module only runs the steps.

An attempt that fails for a reason worth retrying gives the video back (pending,
its model job id kept) and raises `Retry`; the task schedules the next attempt,
which resumes the model job rather than paying for another.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from kinora.core import logs
from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import Video, utcnow
from kinora.jobs import dispatch, event_floor
from kinora.jobs import store as jobs
from kinora.jobs.errors import RetryPolicy, VideoTimeout
from kinora.jobs.lifecycle import (
    LOADING_REFERENCE,
    PROGRESS,
    Step,
    VideoParameters,
    content_path,
    model_progress,
)
from kinora.jobs.reference import load as load_reference
from kinora.streaming.events import SSELogger, describe_error
from kinora.worker import handback, media, reference
from kinora.worker.engines import ModelJob, PolicyRefusal, VideoEngine, get_engine
from kinora.worker.engines.timed import TimedEngine

log = logging.getLogger(__name__)


class JobLost(Exception):
    """The video is no longer this worker's (cancelled, timed out, taken over). Whoever
    took it tells the watchers, so the logger publishes nothing for it."""

    silent = True


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


@dataclass(frozen=True)
class Job:
    """What a generation needs to know about its video, read once at the claim."""

    video_id: int
    user_id: int
    owner: str
    prompt: str
    params: VideoParameters
    deadline: datetime
    progress: int
    model_job_id: str | None
    model_submitted_at: datetime | None
    attempt: int
    last_seq: int


def worker_identity(task_id: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id}"


def _claim(video_id: int, owner: str) -> Job | None:
    settings = get_settings()
    with session_scope() as session:
        if not jobs.claim(session, video_id, owner, settings.lease_seconds):
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
            left = jobs.lease_left(session, video_id, f":{task_id}")
        if left is not None:
            log.info("video %s: this task's earlier delivery holds it %.1f s more", video_id, left)
            SSELogger(video_id, last_seq=event_floor.floor(video_id)).log(
                f"Its worker stopped answering: resuming in {left:.0f} s"
            )
            raise WaitForLease(left)
        log.info("video %s is not pending: skipped (duplicate delivery)", video_id)
        return {"status": "skipped", "video_id": video_id}
    events = SSELogger(
        video_id,
        retry_count=retry_count,
        max_retries=max_retries,
        will_retry=lambda exc: policy.will_retry(exc, retry_count),
        last_seq=job.last_seq,
        on_complete=event_floor.end_recorder(video_id),
    )
    events.progress = job.progress
    events.stage_name = Step.QUEUED.stage  # opened by the API with step 0
    log.info(
        "video %s claimed: attempt %d%s", video_id, job.attempt,
        f", resuming model job {job.model_job_id}" if job.model_job_id else "",
    )  # fmt: skip
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
                        ours = jobs.release(session, video_id, owner)
                    else:
                        ours = jobs.fail(session, video_id, describe_error(exc), owner=owner)
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
        return {"status": "failed", "video_id": video_id, "error": describe_error(exc)}
    log.info("video %s completed", video_id)
    return {"status": "completed", "video_id": video_id}


def _hand_back(job: Job, events: SSELogger) -> dict[str, Any]:
    """Give the video back to the queue: pending again (its model job id kept), and a
    new message for another worker. If it was cancelled meanwhile, nothing to do."""
    with session_scope() as session:
        ours = jobs.release(session, job.video_id, job.owner)
    if ours:
        events.log("This worker is shutting down: the video goes back to the queue")
        dispatch.generate_video(job.video_id, trace_id=logs.current_trace_id())
        log.info("video %s handed back to the queue (worker shutting down)", job.video_id)
    return {"status": "handed_back", "video_id": job.video_id}


def _status(video_id: int) -> str | None:
    with session_scope() as session:
        video = session.get(Video, video_id)
        return str(video.status) if video else None


class Lease:
    """Renews the worker's claim in a background thread while the job runs, so that
    only a dead worker's claim expires. `lost` turns true when the video is no longer
    ours (cancelled, timed out and failed by a sweeper)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.seconds = get_settings().lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with session_scope() as session:
                    if not jobs.renew(session, self.job.video_id, self.job.owner, self.seconds):
                        self.lost.set()
                        return
            except Exception:
                log.exception("could not renew the claim on video %s", self.job.video_id)


class Generation:
    def __init__(self, job: Job, engine: VideoEngine, events: SSELogger, lease: Lease) -> None:
        self.job = job
        self.engine = engine
        self.events = events
        self.lease = lease
        self.settings = get_settings()
        self.finalizing = False

    def run(self) -> None:
        if self.job.model_job_id:
            # A retry or a redelivery: the model already has the job; resume it.
            self.events.stage(Step.SUBMITTED.stage, f"Resuming model job {self.job.model_job_id}")
            model_job = self.poll(self.engine.retrieve(self.job.model_job_id))
        else:
            ref = self.prepare()
            model_job = self.poll(self.submit(ref))
        self.finalize(model_job)

    # -- helpers -------------------------------------------------------------------

    def step(self, step: Step, message: str, progress: int | None = None) -> None:
        """Record progress (renewing the lease), then tell the watchers. The progress
        is the step's own (lifecycle.PROGRESS) unless given."""
        progress = PROGRESS[step] if progress is None else progress
        self.check()
        with session_scope() as session:
            if not jobs.record_progress(
                session,
                self.job.video_id,
                self.job.owner,
                progress,
                self.settings.lease_seconds,
                seq=self.events.last_seq,
            ):
                raise JobLost(self.job.video_id)
        self.events.step(step, message, progress=progress)

    def check(self) -> None:
        """Between steps: stop if the video is no longer ours or past its deadline, and
        give it back if the worker is shutting down (unless it is almost done)."""
        if self.lease.lost.is_set():
            raise JobLost(self.job.video_id)
        if not self.finalizing and handback.requested():
            raise handback.HandBack
        if utcnow() > self.job.deadline:
            raise VideoTimeout(self.settings.video_timeout_seconds)

    # -- the three stages ---------------------------------------------------------------

    def prepare(self) -> bytes | None:
        job = self.job
        params = job.params
        self.step(Step.VALIDATING, "Validating request parameters...")
        if not params.supported:
            raise PolicyRefusal(
                f"unsupported size {params.size} or length {params.seconds}s",
                code="invalid_request",
            )
        if not params.image_url:
            self.step(Step.REFERENCE_IMAGE, "No reference image")
            return None
        self.step(Step.REFERENCE_IMAGE, "Loading reference image...", LOADING_REFERENCE)
        ref = reference.prepare(load_reference(params.image_url), params.size)
        self.step(Step.REFERENCE_IMAGE, f"Reference image ready ({params.size})")
        return ref

    def submit(self, ref: bytes | None) -> ModelJob:
        job = self.job
        self.events.stage(Step.SUBMITTED.stage, "Generating video")
        model_job = None
        if job.model_submitted_at is not None:
            # An earlier attempt called create but never learned the outcome.
            model_job = self.engine.find(
                prompt=job.prompt, since=job.model_submitted_at.timestamp() - 1
            )
            if model_job is not None:
                self.events.log(f"Found model job {model_job.id} from an earlier attempt")
        if model_job is None:
            with session_scope() as session:
                if not jobs.mark_submitting(session, job.video_id, job.owner):
                    raise JobLost(job.video_id)
            model_job = self.engine.create(
                prompt=job.prompt, seconds=job.params.seconds, size=job.params.size, reference=ref
            )
        with session_scope() as session:
            if not jobs.set_model_job(session, job.video_id, job.owner, model_job.id):
                raise JobLost(job.video_id)
        self.step(Step.SUBMITTED, f"Model job {model_job.id} submitted")
        self.step(Step.WAITING, "Waiting for the model to start...")
        return model_job

    def poll(self, model_job: ModelJob) -> ModelJob:
        reported = -1
        while model_job.status not in ("completed", "failed"):
            self.check()
            handback.sleep(model_job.poll_after or self.settings.mock_step_seconds)
            model_job = self.engine.retrieve(model_job.id)
            if model_job.status == "in_progress" and model_job.progress != reported:
                reported = model_job.progress
                self.step(
                    Step.PROCESSING, self.processing_message(reported), model_progress(reported)
                )
        if model_job.status == "failed":
            message = model_job.error_message or "the model could not generate this video"
            raise PolicyRefusal(message, code=model_job.error_code or "model_failed")
        self.step(Step.PROCESSING, self.processing_message(100))
        return model_job

    def finalize(self, model_job: ModelJob) -> None:
        job = self.job
        self.finalizing = True
        self.events.stage(Step.DOWNLOADING.stage, "Finalizing video")
        storage = self.settings.resolved_storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        download = storage / f"{job.video_id}.download.mp4"
        final = storage / f"{job.video_id}.mp4"
        thumb = storage / f"{job.video_id}.jpg"
        self.step(Step.DOWNLOADING, "Downloading video...")
        try:
            self.engine.download(model_job.id, download)
            self.step(Step.SAVING, "Saving video...")
            width, height, duration, codec = media.probe(download)
            download.replace(final)
        finally:
            download.unlink(missing_ok=True)  # nothing half-written is left behind
        self.step(Step.THUMBNAIL, "Creating thumbnail...")
        media.write_thumbnail(final, thumb)
        with session_scope() as session:
            done = jobs.complete(
                session, job.video_id, job.owner, file_path=str(final), thumbnail_path=str(thumb)
            )
        if not done:  # cancelled (or timed out) at the last moment: keep nothing
            _remove(final, thumb)
            raise JobLost(job.video_id)
        self.events.step(
            Step.DONE,
            f"Done: {width}x{height}, {duration:.1f} s, {codec}",
            progress=PROGRESS[Step.DONE],
            status="completed",
        )
        self.events.complete(video_url=content_path(job.video_id, job.user_id))

    def processing_message(self, model_percent: int) -> str:
        seconds = self.job.params.seconds
        return f"Processing video... ({seconds * model_percent / 100:g}/{seconds}s elapsed)"


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
