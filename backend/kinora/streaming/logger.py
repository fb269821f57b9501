"""`SSELogger`: a job publishes its steps (docs/library.md), synchronously, one round trip
per event, from Celery's prefork workers. Publishing never breaks the task: an event
Redis cannot take now waits in the outbox and goes out, in order, once it is back."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import redis
import redis.cluster

from kinora.streaming import keys
from kinora.streaming.connect import sync_redis
from kinora.streaming.events import (
    PUBLISH_LUA,
    PUBLISH_SHA,
    EventType,
    Outcome,
    Stage,
    describe_error,
    encode_body,
    ending,
    script_args,
)
from kinora.streaming.keys import StreamKey
from kinora.streaming.metrics import StreamMetrics
from kinora.streaming.outbox import OUTBOX, Pending
from kinora.streaming.settings import Retention

log = logging.getLogger(__name__)


# One synchronous client per Redis per worker process: prefork children must not share
# the parent's sockets, so the clients are keyed by pid.
_sync_lock = threading.Lock()
_sync_clients: dict[tuple[int, str], redis.Redis] = {}


def sync_client(url: str | None = None) -> redis.Redis:
    """This process's client of `url` (REDIS_URL by default)."""
    url = url or os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError("no Redis to publish to: set REDIS_URL, or pass redis_url= to SSELogger")
    pid = os.getpid()
    client = _sync_clients.get((pid, url))
    if client is None:
        with _sync_lock:
            client = _sync_clients.get((pid, url))
            if client is None:
                if any(owner != pid for owner, _ in _sync_clients):
                    _sync_clients.clear()  # a forked child: the parent's are not ours
                client = _sync_clients[(pid, url)] = sync_redis(url)
    return client


def close_sync_clients() -> None:
    """Close this process's clients (the settings changed, or the process is done)."""
    with _sync_lock:
        for client in _sync_clients.values():
            client.close()
            pool = getattr(client, "connection_pool", None)  # a cluster's: per node
            if pool is not None:
                pool.disconnect()
        _sync_clients.clear()


def task_redis_url(task: Any) -> str:
    """Where a Celery task's events go: REDIS_URL if set, else the task's app's broker
    when that is Redis (docs/library.md)."""
    configured = os.environ.get("REDIS_URL")
    if configured:
        return configured
    broker = str(task.app.conf.broker_url or "")
    if broker.startswith(("redis://", "rediss://", "unix://")):
        return broker
    raise RuntimeError(
        f"the task's broker ({broker.split('://')[0] or 'none'}) is not Redis: set REDIS_URL "
        "to the Redis that your API's progress_router reads"
    )


# With a store, the job's floor is written every this many events (and at each stage
# and at the end): a Redis that lost a job's counter numbers its next event
# SEQ_JUMP_AFTER_LOSS (100) above the floor, so a floor this far behind still never
# reuses a seq.
STORE_EVERY = 32


class Recorder(Protocol):
    """What the logger writes to a store (kinora.streaming.sqlstore.SQLStore)."""

    def floor(self, key: StreamKey) -> int: ...

    def record(
        self,
        key: StreamKey,
        seq: int,
        *,
        status: str | None = None,
        progress: int | None = None,
        end: bool = False,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None: ...


class SSELogger:
    """Publishes the steps of one job; usable as a context manager.

    `job` is a job's id (a string or an integer) or a StreamKey. The design card's call,
    `SSELogger(video_id)`, is that video's stream (`video:<id>`, events with `video_id`),
    from any Celery task (docs/library.md); another kind of job names itself:
    `SSELogger(job_id, kind="import")` publishes to `import:<id>`, events with
    `import_id`. In a bound Celery task, `SSELogger.for_task(self)` takes the task's id,
    kind `job` unless given one, and the task's broker.

    `will_retry(exc)` tells whether an exception leaving the block will be retried
    (the job's retry policy decides); if not, it is final and a `complete` event with
    status `failed` follows the `error` event. `retry_count` and `max_retries` are
    told on the error event, and `retry_in` (seconds) when the job will be retried.
    `last_seq` is the highest seq the caller knows was used (the database's floor):
    no event gets a seq at or below it. `on_complete(seq)` is called once the
    `complete` event is published, to record where the video's events end. `store`
    (an SQLStore) keeps the job's floor and outcome durably, for a `progress_router`
    given the same store (docs/library.md, "A store").
    """

    def __init__(
        self,
        job: StreamKey | str | int,
        *,
        kind: str = "video",
        redis_url: str | None = None,
        retry_count: int = 0,
        max_retries: int = 0,
        will_retry: Callable[[BaseException], bool] | None = None,
        retry_in: float | None = None,
        client: redis.Redis | None = None,
        last_seq: int = 0,
        on_complete: Callable[[int], None] | None = None,
        retention: Retention | None = None,
        store: Recorder | None = None,
    ) -> None:
        self.key = job if isinstance(job, StreamKey) else keys.of(kind, job)
        # EVENT_HISTORY_MAX and EVENT_RETENTION_SECONDS unless the host says.
        self.retention = retention or Retention.from_env()
        self._redis_url = redis_url
        self.retry_count = retry_count
        self.max_retries = max_retries
        self._will_retry = will_retry or (lambda _exc: False)
        self.retry_in = retry_in
        self._client = client
        self.stage_name: str | None = None
        self.progress: int | None = None
        self.last_seq = last_seq
        self.ended = False  # the `complete` is published (by us, or by someone else)
        self._on_complete = on_complete
        self.store = store
        if store is not None:
            self.last_seq = max(self.last_seq, self._stored(store.floor, self.key) or 0)
        self._recorded = self.last_seq

    @classmethod
    def for_task(cls, task: Any, *, kind: str = "job", **kwargs: Any) -> Self:
        """The logger of a bound Celery task's run (`@app.task(bind=True)`): its job id
        is the task's id (kind `job` unless given one), its retries are told on error
        events, and its events go to REDIS_URL or, unset, to the task's Redis broker."""
        kwargs.setdefault("retry_count", task.request.retries or 0)
        if isinstance(task.max_retries, int):
            kwargs.setdefault("max_retries", task.max_retries)
        return cls(keys.of(kind, task.request.id), redis_url=task_redis_url(task), **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        if exc is None or not isinstance(exc, Exception) or getattr(exc, "silent", False):
            # Success; a KeyboardInterrupt/SystemExit; or an exception marked `silent`
            # (the job was taken away, and whoever took it tells the watchers).
            return False
        will_retry = self._will_retry(exc)
        self.error(
            describe_error(exc),
            error_code=getattr(exc, "code", None) or type(exc).__name__,
            is_retryable=will_retry,
            retry_in_seconds=self.retry_in if will_retry else None,
        )
        if not will_retry:
            self.complete(status="failed", reason=describe_error(exc))
        return False

    # -- the calls a job makes ------------------------------------------------------

    def step(
        self, step: int | None, message: str, *, progress: int | None = None, **fields: Any
    ) -> int | None:
        if progress is not None:
            # progress never goes backwards, whatever the caller passes
            progress = max(progress, self.progress or 0)
            self.progress = progress
        event_type: EventType = "progress" if progress is not None else "log"
        return self.publish(event_type, message, step=step, progress=progress, **fields)

    def update(
        self, current: int, total: int, message: str | None = None, **fields: Any
    ) -> int | None:
        """`current` of `total` done: a progress event with `progress` =
        round(100 * current / total), and `current` and `total` themselves."""
        progress = round(100 * current / total) if total > 0 else 0
        return self.step(
            fields.pop("step", None),
            message or f"{current} of {total}",
            progress=min(max(progress, 0), 100),
            current=current,
            total=total,
            **fields,
        )

    def log(self, message: str, **fields: Any) -> int | None:
        return self.publish("log", message, **fields)

    def stage(self, stage: Stage, message: str | None = None, **fields: Any) -> int | None:
        previous, self.stage_name = self.stage_name, stage
        return self.publish(
            "stage",
            message or f"Stage: {stage}",
            stage=stage,
            previous_stage=previous,
            progress=self.progress,
            **fields,
        )

    def error(
        self, message: str, *, error_code: str, is_retryable: bool, **fields: Any
    ) -> int | None:
        return self.publish(
            "error",
            message,
            error_code=error_code,
            retry_count=self.retry_count,
            max_retries=self.max_retries,
            is_retryable=is_retryable,
            **fields,
        )

    def complete(
        self,
        *,
        status: Outcome = "completed",
        reason: str | None = None,
        **result: Any,
    ) -> int | None:
        """The job's last event (events.ending): nothing is published after it. A
        completed job's `result` fields go with it (a video's `video_url`)."""
        message, fields = ending(self.key, status, reason=reason, **result)
        if status == "completed":
            self.progress = 100
        if self.store is not None and not self.ended:
            # The outcome first: if Redis cannot take the `complete` now, a stream
            # publishes it from the store later.
            self._stored(
                self.store.record, self.key, self.last_seq, status=status,
                progress=self.progress, reason=reason, result=result or None,
            )  # fmt: skip
        return self.publish("complete", message, **fields)

    def _stored(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store's call; a store that fails is logged, and the job goes on."""
        try:
            return call(*args, **kwargs)
        except Exception:
            log.exception("the store of %s could not be written or read", self.key)
            return None

    # -- the one round trip -----------------------------------------------------------

    def publish(self, event_type: EventType, message: str, **fields: Any) -> int | None:
        """Publish one event; returns its seq, or None if it was not published now.

        Publishing never breaks the job: when Redis cannot be reached the event is
        logged, counted and kept in the process's outbox, which publishes it (and the
        video's later events, in order) once Redis is back (kinora.streaming.outbox). None also
        when the video's `complete` is out: nothing follows it.
        """
        if "status" not in fields and event_type in ("progress", "stage"):
            fields["status"] = "processing"
        if self.ended:
            return None
        body = encode_body(self.key, event_type, message, fields)
        terminal = event_type == "complete"
        if terminal:
            self.ended = True
        uid = os.urandom(8).hex()
        if not (OUTBOX.holds(self.key) and not OUTBOX.flush()):
            try:
                return self._send(event_type, body, terminal, uid)
            except redis.RedisError as exc:
                log.warning(
                    "event for %s not published (%s); kept until Redis is back: %s",
                    self.key, exc, body.decode(),
                )  # fmt: skip
        StreamMetrics.of().events_not_published.inc()
        OUTBOX.add(Pending(self.key, lambda: self._send(event_type, body, terminal, uid)))
        return None

    def _send(self, event_type: EventType, body: bytes, terminal: bool, uid: str) -> int | None:
        """The one round trip; raises redis.RedisError."""
        client = self._client or sync_client(self._redis_url)
        sharded = isinstance(client, redis.cluster.RedisCluster)
        names, args = script_args(
            self.key, body, self.last_seq, terminal, self.retention, uid, sharded=sharded
        )
        try:  # EVALSHA straight away: redis-py's Script wrapper costs a tenth of a call
            seq = int(client.evalsha(PUBLISH_SHA, len(names), *names, *args))
        except redis.exceptions.NoScriptError:  # a Redis that has not seen it (restarted)
            client.script_load(PUBLISH_LUA)
            seq = int(client.evalsha(PUBLISH_SHA, len(names), *names, *args))
        if not seq:  # the job's `complete` is out: the script refused
            self.ended = True
            log.info("event for %s refused: its complete was published", self.key)
            return None
        StreamMetrics.of().published(event_type).inc()
        self.last_seq = seq
        store = self.store
        if store is not None and (
            terminal or event_type == "stage" or seq - self._recorded >= STORE_EVERY
            or not self._recorded
        ):  # fmt: skip
            self._recorded = seq
            self._stored(store.record, self.key, seq, progress=self.progress, end=terminal)
        if terminal and self._on_complete is not None:
            self._on_complete(seq)
        return seq
