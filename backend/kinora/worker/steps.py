"""The steps of one video's generation (docs/protocol.md §2), talking to an engine and an
SSELogger. Three stages: preparing (steps 0-2), generating (3-5) and finalizing
(6-9), with the progress of jobs.lifecycle. Step 0 (queued) is published by the API
when it queues the job; the worker carries on from step 1. The database decides what
happens (jobs.store), the logger says what happened; this module only runs the steps.
"""

from __future__ import annotations

from pathlib import Path

from kinora.core import tracing
from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import utcnow
from kinora.jobs import store
from kinora.jobs.errors import VideoTimeout
from kinora.jobs.lifecycle import (
    LOADING_REFERENCE,
    PROGRESS,
    Step,
    content_path,
    model_progress,
)
from kinora.jobs.reference import load as load_reference
from kinora.streaming.logger import SSELogger
from kinora.worker import handback, media, reference
from kinora.worker.engines import ModelJob, PolicyRefusal, VideoEngine
from kinora.worker.job import Job, JobLost
from kinora.worker.lease import Lease


class Generation:
    def __init__(self, job: Job, engine: VideoEngine, events: SSELogger, lease: Lease) -> None:
        self.job = job
        self.engine = engine
        self.events = events
        self.lease = lease
        self.settings = get_settings()
        self.finalizing = False

    def run(self) -> None:
        """The three stages, each a span of the video's trace (kinora.core.tracing)."""
        video = self.job.video_id
        if self.job.model_job_id:
            # A retry or a redelivery: the model already has the job; resume it.
            self.events.stage(Step.SUBMITTED.stage, f"Resuming model job {self.job.model_job_id}")
            with tracing.span("video.generating", video_id=video):
                model_job = self.poll(self.engine.retrieve(self.job.model_job_id))
        else:
            with tracing.span("video.preparing", video_id=video):
                ref = self.prepare()
            with tracing.span("video.generating", video_id=video):
                model_job = self.poll(self.submit(ref))
        with tracing.span("video.finalizing", video_id=video):
            self.finalize(model_job)

    # -- helpers -------------------------------------------------------------------

    def step(self, step: Step, message: str, progress: int | None = None) -> None:
        """Record progress (renewing the lease), then tell the watchers. The progress
        is the step's own (lifecycle.PROGRESS) unless given."""
        progress = PROGRESS[step] if progress is None else progress
        self.check()
        with session_scope() as session:
            if not store.record_progress(
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
        if self.finalizing:
            # The model's job is done and paid for: it is delivered, whatever the
            # deadline (README, Faults; the deadline bounds the wait for the model).
            return
        if handback.requested():
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
        model_job = self.find_own() if job.model_submitted_at is not None else None
        try:
            if model_job is None:
                model_job = self.create(ref)
            self.record(model_job)
        except store.ModelJobTaken as taken:
            # Adopted, but another video recorded it first: it was that one's.
            self.events.log(f"Model job {taken} belongs to another video: a new one is made")
            model_job = self.create(ref)
            self.record(model_job)
        self.step(Step.SUBMITTED, f"Model job {model_job.id} submitted")
        self.step(Step.WAITING, "Waiting for the model to start...")
        return model_job

    def find_own(self) -> ModelJob | None:
        """An earlier attempt called create but never learned the outcome: the job it
        made, if the model lists one that is surely this video's (same prompt and
        parameters, recorded by no other video, no other create in doubt)."""
        job = self.job
        assert job.model_submitted_at is not None
        found = self.engine.find(
            prompt=job.prompt, seconds=job.params.seconds, size=job.params.size,
            since=job.model_submitted_at.timestamp() - 1,
        )  # fmt: skip
        with session_scope() as session:
            own = store.adoptable(session, job.video_id, job.prompt, [j.id for j in found])
        if own is not None:
            self.events.log(f"Found model job {own} from an earlier attempt")
        elif found:
            self.events.log("No model job is surely this video's: a new one is made")
        return next((j for j in found if j.id == own), None)

    def create(self, ref: bytes | None) -> ModelJob:
        job = self.job
        with session_scope() as session:
            if not store.mark_submitting(session, job.video_id, job.owner):
                raise JobLost(job.video_id)
        return self.engine.create(
            prompt=job.prompt, seconds=job.params.seconds, size=job.params.size, reference=ref
        )

    def record(self, model_job: ModelJob) -> None:
        with session_scope() as session:
            if not store.set_model_job(session, self.job.video_id, self.job.owner, model_job.id):
                raise JobLost(self.job.video_id)

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
        self.finalizing = True  # looked at before the deadline: a finished job is delivered
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
            done = store.complete(
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
