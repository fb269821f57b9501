"""Every call to the video model timed into Prometheus (kinora.core.metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kinora.core.metrics import MODEL_ERRORS, MODEL_SECONDS
from kinora.worker.engines.base import ModelJob, VideoEngine


@contextmanager
def timed_model_call(call: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception:
        MODEL_ERRORS.labels(call).inc()
        raise
    finally:
        MODEL_SECONDS.labels(call).observe(time.perf_counter() - start)


class TimedEngine:
    """A video engine whose every call is timed into MODEL_SECONDS."""

    def __init__(self, engine: VideoEngine) -> None:
        self.engine = engine

    def create(
        self, *, prompt: str, seconds: int, size: str, reference: bytes | None = None
    ) -> ModelJob:
        with timed_model_call("create"):
            return self.engine.create(
                prompt=prompt, seconds=seconds, size=size, reference=reference
            )

    def find(self, *, prompt: str, seconds: int, size: str, since: float) -> list[ModelJob]:
        with timed_model_call("find"):
            return self.engine.find(prompt=prompt, seconds=seconds, size=size, since=since)

    def retrieve(self, job_id: str) -> ModelJob:
        with timed_model_call("retrieve"):
            return self.engine.retrieve(job_id)

    def download(self, job_id: str, dest: Path) -> None:
        with timed_model_call("download"):
            self.engine.download(job_id, dest)
