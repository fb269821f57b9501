"""What one attempt at a video knows about it (read once, at the claim) and who it is."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

from kinora.jobs.lifecycle import VideoParameters


class JobLost(Exception):
    """The video is no longer this worker's (cancelled, timed out, taken over). Whoever
    took it tells the watchers, so the logger publishes nothing for it."""

    silent = True


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
