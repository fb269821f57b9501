"""Thin Celery tasks: the steps live in `generation`, testable without a broker."""

from __future__ import annotations

from typing import Any

from celery import shared_task

# Importing the app makes it the current one, so that `shared_task` binds to it in
# every process that queues tasks (the API), not only in the worker.
from kinora import celery_app as _celery_app  # noqa: F401
from kinora import generation


@shared_task(name="kinora.generate_video", bind=True)  # type: ignore[untyped-decorator]
def generate_video(self: Any, video_id: int) -> dict[str, Any]:
    return generation.run(video_id, task_id=self.request.id or "eager")
