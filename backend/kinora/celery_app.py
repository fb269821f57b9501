"""The Celery application, configured from Settings."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from kinora.config import get_settings


def make_celery() -> Celery:
    settings = get_settings()
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    app = Celery("kinora", broker=url, backend=url, include=["kinora.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=86400,
        # A message is acknowledged only once its task has finished, and handed back
        # if the worker dies, so a crash never loses a video (CONTRACT §7).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The Redis broker redelivers unacknowledged messages after this long; it must
        # exceed the longest generation or a running job would be delivered twice.
        broker_transport_options={"visibility_timeout": settings.video_timeout_seconds + 600},
        result_backend_transport_options={
            "visibility_timeout": settings.video_timeout_seconds + 600
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue="kinora",
    )
    return app


app = make_celery()
# The current app is per thread; make this one the default too, so that `shared_task`
# resolves to it in every thread (the API queues tasks from a thread pool).
app.set_default()


_sweeper: Any = None
_bound: dict[str, Any] = {}


@signals.task_prerun.connect  # type: ignore[untyped-decorator]
def _bind_job_ids(task_id: str, args: Any = (), kwargs: Any = None, **_: Any) -> None:
    """Every line logged while a generation runs, Celery's own "succeeded" or "retry"
    line included, carries its video id and trace id (kinora.logs)."""
    from kinora import logs

    kwargs = kwargs or {}
    video_id = args[0] if args else kwargs.get("video_id")
    scope = logs.bind(trace_id=kwargs.get("trace_id") or task_id, video_id=video_id)
    scope.__enter__()
    _bound[task_id] = scope


@signals.task_postrun.connect  # type: ignore[untyped-decorator]
def _unbind_job_ids(task_id: str, **_: Any) -> None:
    scope = _bound.pop(task_id, None)
    if scope is not None:
        scope.__exit__(None, None, None)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _arm_hand_back(**_kwargs: Any) -> None:
    from kinora import handback

    handback.arm()


@signals.worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_back_running_videos(**_kwargs: Any) -> None:
    from kinora import handback

    handback.begin()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeper(**_kwargs: Any) -> None:
    global _sweeper
    from kinora.sweeper import Sweeper

    _sweeper = Sweeper()
    _sweeper.start()


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_sweeper(**_kwargs: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
