"""What the generation asks of a video model, in the shape of the OpenAI videos API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from kinora.jobs.errors import EngineError, PolicyRefusal, TransientEngineError

__all__ = [
    "EngineError",
    "JobStatus",
    "ModelJob",
    "PolicyRefusal",
    "TransientEngineError",
    "VideoEngine",
]

JobStatus = Literal["queued", "in_progress", "completed", "failed"]


@dataclass(frozen=True)
class ModelJob:
    id: str
    status: JobStatus
    progress: int = 0
    error_code: str | None = None
    error_message: str | None = None
    # The server's hint for when to ask again (openai-poll-after-ms), in seconds.
    poll_after: float | None = None


class VideoEngine(Protocol):
    def create(
        self, *, prompt: str, seconds: int, size: str, reference: bytes | None = None
    ) -> ModelJob: ...

    def find(self, *, prompt: str, seconds: int, size: str, since: float) -> list[ModelJob]:
        """The jobs with this prompt, length and size created at or after `since` (epoch
        seconds): a create whose outcome is unknown (a timeout, a crash) is looked for
        here before any second, paid, create. Which of them is the video's own, if any,
        is the database's call (jobs.store.adoptable)."""
        ...

    def retrieve(self, job_id: str) -> ModelJob: ...

    def download(self, job_id: str, dest: Path) -> None: ...
