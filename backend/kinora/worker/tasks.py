"""Thin Celery tasks: the steps live in `generation`, testable without a broker."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from kinora.core import metrics
from kinora.core.config import get_settings
from kinora.jobs import dispatch
from kinora.worker import attempt


@shared_task(name=dispatch.GENERATE_VIDEO, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def generate_video(self: Any, video_id: int, trace_id: str | None = None) -> dict[str, Any]:
    """One attempt at a video; transient failures come back after
    RETRY_COUNTDOWN_SECONDS, at most MAX_RETRIES times (README, How it works). Every line
    logged while it runs carries the video id and the trace id of the request that
    queued it (celery_app binds them), or the task id when the sweeper queued it."""
    settings = get_settings()
    task_id = self.request.id or "eager"
    start = time.perf_counter()
    outcome = "error"
    try:
        result = attempt.run(
            video_id,
            task_id=task_id,
            retry_count=self.request.retries,
            max_retries=settings.max_retries,
        )
        outcome = str(result["status"])
        return result
    except attempt.Retry as exc:
        outcome = "retry"
        raise self.retry(exc=exc.cause, countdown=settings.retry_countdown_seconds) from exc
    except attempt.WaitForLease as exc:
        # The same task again (same id, same retry count: waiting is no retry), once
        # the dead delivery's lease has run out.
        outcome = "waiting"
        dispatch.generate_video(
            video_id,
            trace_id=trace_id,
            task_id=task_id,
            countdown=exc.seconds + 0.5,
            retries=self.request.retries,
        )
        return {"status": "waiting", "video_id": video_id, "seconds": exc.seconds}
    finally:
        metrics.TASKS.labels(outcome).inc()
        metrics.TASK_SECONDS.labels(outcome).observe(time.perf_counter() - start)
