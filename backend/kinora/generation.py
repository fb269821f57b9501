"""The steps of one video's generation (CONTRACT §4), talking to an engine and an SSELogger.

Three stages: preparing (steps 0-2, progress 0-10), generating (3-5, 10-85) and
finalizing (6-9, 85-100). Step 0 (queued) is published by the API when it queues
the job; the worker carries on from step 1. The database decides what happens
(`jobs`), the logger says what happened; this module only runs the steps.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from kinora import jobs, media, reference
from kinora.config import get_settings
from kinora.db import session_scope
from kinora.engines import EngineError, ModelJob, PolicyRefusal, VideoEngine, get_engine
from kinora.events import SSELogger, describe_error
from kinora.models import Video
from kinora.tokens import sign_scoped

log = logging.getLogger(__name__)

SIZES = ("1280x720", "720x1280")
SECONDS = (4, 8, 12)


class JobLost(Exception):
    """The video is no longer this worker's (cancelled, failed elsewhere, taken over)."""


class VideoTimeout(EngineError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"generation took longer than {limit} s", code="timeout")


@dataclass(frozen=True)
class Job:
    """What a generation needs to know about its video, read once at the claim."""

    video_id: int
    user_id: int
    owner: str
    prompt: str
    seconds: int
    size: str
    image_url: str | None


def worker_identity(task_id: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id}"


def content_url(video_id: int, user_id: int) -> str:
    return f"/api/v1/videos/{video_id}/content?token={sign_scoped(video_id, user_id)}"


def run(video_id: int, *, task_id: str, engine: VideoEngine | None = None) -> dict[str, Any]:
    """Generate one video unless someone else holds it. Returns the task's result."""
    settings = get_settings()
    owner = worker_identity(task_id)
    with session_scope() as session:
        if not jobs.claim(session, video_id, owner, settings.video_timeout_seconds):
            log.info("video %s is not pending: skipped (duplicate delivery)", video_id)
            return {"status": "skipped", "video_id": video_id}
        video = session.get(Video, video_id)
        assert video is not None  # just claimed
        params = video.parameters
        job = Job(
            video_id=video_id,
            user_id=video.user_id,
            owner=owner,
            prompt=video.prompt,
            seconds=int(params.get("seconds", 4)),
            size=str(params.get("size", SIZES[0])),
            image_url=params.get("image_url"),
        )
    try:
        with SSELogger(video_id) as events:
            events.stage_name = "preparing"  # opened by the API with step 0
            try:
                Generation(job, engine or get_engine(), events).run()
            except JobLost:
                log.info("video %s was taken from this worker; stopped", video_id)
                return {"status": "abandoned", "video_id": video_id}
            except Exception as exc:
                # The database first, so a client that reads `complete` (published
                # by the logger as the exception leaves the block) sees `failed`.
                with session_scope() as session:
                    jobs.fail(session, video_id, describe_error(exc), owner=owner)
                raise
    except Exception as exc:
        log.warning("video %s failed: %s", video_id, describe_error(exc))
        return {"status": "failed", "video_id": video_id, "error": describe_error(exc)}
    return {"status": "completed", "video_id": video_id}


class Generation:
    def __init__(self, job: Job, engine: VideoEngine, events: SSELogger) -> None:
        self.job = job
        self.engine = engine
        self.events = events
        self.settings = get_settings()
        self.started = time.monotonic()

    def run(self) -> None:
        ref = self.prepare()
        model_job = self.generate(ref)
        self.finalize(model_job)

    # -- helpers -------------------------------------------------------------------

    def step(self, step: int, message: str, progress: int) -> None:
        """Record progress (renewing the lease), then tell the watchers."""
        with session_scope() as session:
            if not jobs.record_progress(
                session,
                self.job.video_id,
                self.job.owner,
                progress,
                self.settings.video_timeout_seconds,
            ):
                raise JobLost(self.job.video_id)
        self.events.step(step, message, progress=progress)

    def check_deadline(self) -> None:
        if time.monotonic() - self.started > self.settings.video_timeout_seconds:
            raise VideoTimeout(self.settings.video_timeout_seconds)

    # -- the three stages ---------------------------------------------------------------

    def prepare(self) -> bytes | None:
        job = self.job
        self.step(1, "Validating request parameters...", 3)
        if job.size not in SIZES or job.seconds not in SECONDS:
            raise PolicyRefusal(
                f"unsupported size {job.size} or length {job.seconds}s", code="invalid_request"
            )
        if not job.image_url:
            self.step(2, "No reference image", 10)
            return None
        self.step(2, "Loading reference image...", 6)
        ref = reference.prepare(reference.load(job.image_url), job.size)
        self.step(2, f"Reference image ready ({job.size})", 10)
        return ref

    def generate(self, ref: bytes | None) -> ModelJob:
        job = self.job
        self.events.stage("generating", "Generating video")
        model_job = self.engine.create(
            prompt=job.prompt, seconds=job.seconds, size=job.size, reference=ref
        )
        with session_scope() as session:
            if not jobs.set_model_job(session, job.video_id, job.owner, model_job.id):
                raise JobLost(job.video_id)
        self.step(3, f"Model job {model_job.id} submitted", 12)
        self.step(4, "Waiting for the model to start...", 15)
        reported = -1
        while model_job.status not in ("completed", "failed"):
            self.check_deadline()
            time.sleep(model_job.poll_after or self.settings.mock_step_seconds)
            model_job = self.engine.retrieve(model_job.id)
            if model_job.status == "in_progress" and model_job.progress != reported:
                reported = model_job.progress
                self.step(
                    5, self.processing_message(model_job.progress), self.scaled(model_job.progress)
                )
        if model_job.status == "failed":
            message = model_job.error_message or "the model could not generate this video"
            raise PolicyRefusal(message, code=model_job.error_code or "model_failed")
        self.step(5, self.processing_message(100), 85)
        return model_job

    def finalize(self, model_job: ModelJob) -> None:
        job = self.job
        self.events.stage("finalizing", "Finalizing video")
        storage = self.settings.resolved_storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        download = storage / f"{job.video_id}.download.mp4"
        final = storage / f"{job.video_id}.mp4"
        thumb = storage / f"{job.video_id}.jpg"
        self.step(6, "Downloading video...", 88)
        try:
            self.engine.download(model_job.id, download)
            self.step(7, "Saving video...", 92)
            width, height, duration, codec = media.probe(download)
            download.replace(final)
        finally:
            download.unlink(missing_ok=True)  # nothing half-written is left behind
        self.step(8, "Creating thumbnail...", 96)
        media.write_thumbnail(final, thumb)
        with session_scope() as session:
            if not jobs.complete(
                session, job.video_id, job.owner, file_path=str(final), thumbnail_path=str(thumb)
            ):
                raise JobLost(job.video_id)
        self.events.step(
            9,
            f"Done: {width}x{height}, {duration:.1f} s, {codec}",
            progress=100,
            status="completed",
        )
        self.events.complete(video_url=content_url(job.video_id, job.user_id))

    def scaled(self, model_progress: int) -> int:
        return 15 + model_progress * 70 // 100

    def processing_message(self, model_progress: int) -> str:
        done = self.job.seconds * model_progress // 100
        return f"Processing video... ({done}/{self.job.seconds}s elapsed)"
