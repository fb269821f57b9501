"""Work for the worker is queued BY NAME through this module, so that nothing imports
the worker to enqueue (the API process never loads PyAV, Pillow or openai) and there
is no import cycle through Celery. The worker's tasks register under these names
(`kinora.worker.tasks`); `kinora.worker.celery_app` configures this same app object
with the worker's signals.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis

from kinora.core.config import get_settings
from kinora.streaming import connect

QUEUE = "kinora"
GENERATE_VIDEO = "kinora.generate_video"
# Webhooks have a queue and a worker of their own (`kinora worker --webhooks`): a
# slow receiver never holds up a generation.
WEBHOOK_QUEUE = "kinora.webhooks"
DELIVER_WEBHOOK = "kinora.deliver_webhook"


# Whether this process's app stores (and can read) tasks' results: the worker's does;
# the API's does not, since with a Redis result backend every task it queued would
# subscribe its process to that task's result channel, for results nobody reads there.
_results = False


def keep_results() -> None:
    """Before the app is first made: this process stores tasks' results (the worker; a
    test that reads them)."""
    global _results
    if celery.cache_info().currsize:
        raise RuntimeError("keep_results() must come before the Celery app is made")
    _results = True


class _PublishingChannel(kombu_redis.Channel):
    """kombu's Redis channel keeps two connection pools: one it pings and polls with
    (for consuming), one it publishes on. A process that only queues work (the API)
    needs one socket, not two: here both are the publishing pool."""

    @property
    def async_pool(self) -> Any:
        return self.pool


class PublishingTransport(kombu_redis.Transport):
    """The Redis transport of a process that only queues (see _PublishingChannel)."""

    Channel = _PublishingChannel


def make_celery(
    broker_url: str | None = None, *, results: bool | None = None, publisher: bool = False
) -> Celery:
    """A Celery app configured from Settings (`kinora up` and the tests make their own
    to ping a worker, on the broker they started). `publisher`: the app only queues
    work, on one Redis connection (the API's third, with the hub's two)."""
    settings = get_settings()
    url = broker_url or settings.broker_url or settings.redis_url or "redis://127.0.0.1:6379/0"
    keep = _results if results is None else results
    # One Redis, whatever its form (a Sentinel URL: kombu's Sentinel transport).
    broker, transport = connect.celery_broker(url)
    app = Celery("kinora", broker=broker, backend=broker if keep else None)
    # The Redis broker redelivers unacknowledged messages after this long; it must
    # exceed the longest generation or a running job would be delivered twice.
    visibility = {"visibility_timeout": settings.video_timeout_seconds + 600, **transport}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=86400,
        # A message is acknowledged only once its task has finished, and handed back
        # if the worker dies, so a crash never loses a video (README, How it works).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=visibility,
        result_backend_transport_options=visibility,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=QUEUE,
    )
    if publisher and not transport:  # (kombu's Sentinel transport keeps its own pools)
        # One connection to the broker, shared by the requests that queue (a publish
        # is one LPUSH: they wait their turn for it, briefly).
        app.conf.update(broker_transport=PublishingTransport, broker_pool_limit=1)
    return app


@cache
def celery() -> Celery:
    """This process's one Celery app: a publisher unless it keeps results (the
    worker's, which consumes)."""
    app = make_celery(publisher=not _results)
    # The current app is per thread; make this one the default too, so that
    # `shared_task` resolves to it in every thread.
    app.set_default()
    return app


def generate_video(
    video_id: int,
    *,
    trace_id: str | None = None,
    task_id: str | None = None,
    countdown: float | None = None,
    retries: int = 0,
) -> None:
    """Queue one attempt at a video. The request's trace id follows the job onto every
    line the worker logs for it; `retries` carries a task's retry count over when it
    queues itself again."""
    celery().send_task(
        GENERATE_VIDEO,
        args=[video_id],
        kwargs={"trace_id": trace_id},
        task_id=task_id,
        countdown=countdown,
        retries=retries,
        queue=QUEUE,
    )


def deliver_webhook(video_id: int, event: str, webhook_id: str, body: str) -> None:
    """Queue one webhook delivery of `body` (its attempts are the task's retries)."""
    celery().send_task(
        DELIVER_WEBHOOK, args=[video_id, event, webhook_id, body], queue=WEBHOOK_QUEUE
    )
