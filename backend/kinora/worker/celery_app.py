"""The worker's Celery app: the dispatch module's app, its tasks and its signals."""

from __future__ import annotations

import signal
from typing import Any

from celery import signals

from kinora.core import logs, tracing
from kinora.core.lifetime import die_with_parent
from kinora.jobs import dispatch
from kinora.worker import handback, holds, tasks, webhooks  # noqa: F401 (registers the tasks)
from kinora.worker.sweeper import Sweeper

# Traces, when an OTLP endpoint is set: before anything makes a database engine (a
# pool process inherits the instrumentation; the span exporter's thread restarts in it).
tracing.start("kinora-worker")

# The one app of this process (kinora.jobs.dispatch), with the worker's tasks, which
# stores their results.
dispatch.keep_results()
app = dispatch.celery()


_sweeper: Any = None
_bound: dict[str, Any] = {}


@signals.task_prerun.connect  # type: ignore[untyped-decorator]
def _bind_job_ids(task_id: str, args: Any = (), kwargs: Any = None, **_: Any) -> None:
    """Every line logged while a generation runs, Celery's own "succeeded" or "retry"
    line included, carries its video id and trace id (kinora.core.logs)."""
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


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _die_with_the_worker(**_kwargs: Any) -> None:
    """A pool process ends with its worker's main process, however that ends: an orphan
    would keep renewing its video's lease and take work no one can stop."""
    die_with_parent(signal.SIGKILL)


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _flush_traces(**_kwargs: Any) -> None:
    tracing.flush()


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _arm_hand_back(**_kwargs: Any) -> None:
    handback.arm()


@signals.worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_back_running_videos(**_kwargs: Any) -> None:
    handback.begin()


@signals.task_received.connect  # type: ignore[untyped-decorator]
def _hold_received_video(request: Any, **_kwargs: Any) -> None:
    holds.received(request)


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeper(**_kwargs: Any) -> None:
    global _sweeper
    _sweeper = Sweeper()
    _sweeper.start()


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_sweeper(**_kwargs: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    holds.drop()  # its held messages go back to the broker as the worker closes
