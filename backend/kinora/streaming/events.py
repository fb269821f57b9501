"""The one event format, and `SSELogger`, which publishes a job's steps (CONTRACT §4, §6).

Every event of a video gets the next `seq` of that video, is added to the video's
history (a sorted set scored by `seq`, capped, expiring) and is published on the
channel `video:<id>`, all in ONE round trip by a Lua script. Why a script and not
MULTI: the `seq` must be written into the JSON that is stored and published, and a
MULTI cannot use the result of its INCR inside the same transaction, so it would
need a second round trip (or WATCH and retries). Redis functions would also do, but
need Redis 7 and the embedded server is Redis 6.2; `EVALSHA` works on both.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NotRequired, Self, TypedDict

import orjson
import redis
import redis.asyncio

from kinora.core import logs, metrics
from kinora.core.config import get_settings
from kinora.streaming.connect import sync_redis
from kinora.streaming.outbox import OUTBOX, Pending

log = logging.getLogger(__name__)

EventType = Literal["log", "progress", "stage", "error", "complete"]
Stage = Literal["preparing", "generating", "finalizing"]


class Event(TypedDict):
    """An event as it travels: JSON on the wire, this shape once parsed."""

    id: str
    seq: int
    video_id: int
    type: EventType
    message: str
    timestamp: str
    step: NotRequired[int]
    progress: NotRequired[int]
    status: NotRequired[str]
    stage: NotRequired[str]
    previous_stage: NotRequired[str | None]
    error_code: NotRequired[str]
    retry_count: NotRequired[int]
    max_retries: NotRequired[int]
    is_retryable: NotRequired[bool]
    trace_id: NotRequired[str]
    video_url: NotRequired[str]
    code: NotRequired[str]


def channel(video_id: int) -> str:
    return f"video:{video_id}"


def history_key(video_id: int) -> str:
    return f"video:{video_id}:events"


def seq_key(video_id: int) -> str:
    return f"video:{video_id}:seq"


def end_key(video_id: int) -> str:
    """Set (to its seq) when a video's `complete` is published: nothing follows it."""
    return f"video:{video_id}:end"


def video_id_of_channel(name: bytes | str) -> int:
    text = name.decode() if isinstance(name, bytes) else name
    return int(text.split(":", 1)[1])


# When Redis has lost a video's counter (flushed, restarted empty, failed over), its
# next event is numbered this far above the floor the publisher knows (the database's
# record lags the true last seq by the few events since its last write), so no seq a
# client has seen is ever used again (CONTRACT §8). Watchers are told of the gap.
SEQ_JUMP_AFTER_LOSS = 100

# KEYS: seq, history, end, sent. ARGV: body (the event's JSON without its opening
# brace), channel, history cap, retention seconds, floor (the highest seq the publisher
# knows was used), "1" if this is the `complete` event, the event's unique id. Returns
# the new seq; the seq it already has when the same event is sent again (a call that
# timed out may still have run: the outbox's resend must not publish it twice); 0 when
# the video's `complete` was published already: nothing is published after it.
PUBLISH_LUA = (
    """
local prior = redis.call('HGET', KEYS[4], ARGV[7])
if prior then
  return tonumber(prior)
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local floor = tonumber(ARGV[5])
local seq
if floor > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  seq = floor + """
    + str(SEQ_JUMP_AFTER_LOSS)
    + """
  redis.call('SET', KEYS[1], seq)
else
  seq = redis.call('INCR', KEYS[1])
  if seq <= floor then
    seq = floor + 1
    redis.call('SET', KEYS[1], seq)
  end
end
if ARGV[6] == '1' then
  redis.call('SET', KEYS[3], seq, 'EX', ARGV[4])
end
local data = '{"id":"' .. seq .. '","seq":' .. seq .. ',' .. ARGV[1]
redis.call('ZADD', KEYS[2], seq, data)
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if extra > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
redis.call('HSET', KEYS[4], ARGV[7], seq)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
redis.call('PUBLISH', ARGV[2], data)
return seq
"""
)


# Fields that are sent as null rather than left out: a stage event always says what
# the previous stage was, `null` for the first.
KEEP_NULL = frozenset({"previous_stage"})


def timestamp() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def encode_body(
    video_id: int, event_type: EventType, message: str, fields: dict[str, Any]
) -> bytes:
    """The event JSON minus `{"id":…,"seq":…,` which the script prepends."""
    body = {
        "video_id": video_id,
        "type": event_type,
        "message": message,
        **{k: v for k, v in fields.items() if v is not None or k in KEEP_NULL},
        "timestamp": timestamp(),
    }
    return orjson.dumps(body)[1:]


def sent_key(video_id: int) -> str:
    """Each published event's unique id → its seq: a resend is not a second event."""
    return f"video:{video_id}:sent"


def _script_args(
    video_id: int, body: bytes, floor: int, terminal: bool, uid: str | None = None
) -> tuple[list[str], list[Any]]:
    settings = get_settings()
    keys = [seq_key(video_id), history_key(video_id), end_key(video_id), sent_key(video_id)]
    args: list[Any] = [
        body,
        channel(video_id),
        settings.event_history_max,
        settings.event_retention_seconds,
        floor,
        "1" if terminal else "0",
        uid or os.urandom(8).hex(),
    ]
    return keys, args


async def publish_async(
    client: redis.asyncio.Redis,
    video_id: int,
    event_type: EventType,
    message: str,
    *,
    floor: int = 0,
    **fields: Any,
) -> int | None:
    """Publish one event from async code (the API). Returns its seq, or None if the
    video's `complete` was published already (then nothing is)."""
    body = encode_body(video_id, event_type, message, fields)
    keys, args = _script_args(video_id, body, floor, event_type == "complete")
    script = client.register_script(PUBLISH_LUA)
    seq = int(await script(keys=keys, args=args))
    if not seq:
        return None
    metrics.EVENTS_PUBLISHED.labels(event_type).inc()
    return seq


# One synchronous client per worker process: prefork children must not share the
# parent's sockets, so the client is keyed by pid.
_sync_lock = threading.Lock()
_sync_clients: dict[int, redis.Redis] = {}


def sync_client() -> redis.Redis:
    pid = os.getpid()
    client = _sync_clients.get(pid)
    if client is None:
        with _sync_lock:
            client = _sync_clients.get(pid)
            if client is None:
                client = sync_redis(get_settings().required_redis_url)
                _sync_clients.clear()
                _sync_clients[pid] = client
    return client


class SSELogger:
    """Publishes the steps of one video's job; usable as a context manager.

    `will_retry(exc)` tells whether an exception leaving the block will be retried
    (the job's retry policy decides); if not, it is final and a `complete` event with
    status `failed` follows the `error` event. `retry_count` and `max_retries` are
    told on the error event.
    `last_seq` is the highest seq the caller knows was used (the database's floor):
    no event gets a seq at or below it. `on_complete(seq)` is called once the
    `complete` event is published, to record where the video's events end.
    """

    def __init__(
        self,
        video_id: int,
        *,
        retry_count: int = 0,
        max_retries: int = 0,
        will_retry: Callable[[BaseException], bool] | None = None,
        client: redis.Redis | None = None,
        last_seq: int = 0,
        on_complete: Callable[[int], None] | None = None,
    ) -> None:
        self.video_id = video_id
        self.retry_count = retry_count
        self.max_retries = max_retries
        self._will_retry = will_retry or (lambda _exc: False)
        self._client = client
        self._script: Any = None
        self.stage_name: str | None = None
        self.progress: int | None = None
        self.last_seq = last_seq
        self.ended = False  # the `complete` is published (by us, or by someone else)
        self._on_complete = on_complete

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
        )
        if not will_retry:
            self.complete(status="failed", message=f"Generation failed: {describe_error(exc)}")
        return False

    # -- the calls a job makes ------------------------------------------------------

    def step(
        self, step: int, message: str, *, progress: int | None = None, **fields: Any
    ) -> int | None:
        if progress is not None:
            # progress never goes backwards, whatever the caller passes
            progress = max(progress, self.progress or 0)
            self.progress = progress
        event_type: EventType = "progress" if progress is not None else "log"
        return self.publish(event_type, message, step=step, progress=progress, **fields)

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
            trace_id=logs.current_trace_id(),
            error_code=error_code,
            retry_count=self.retry_count,
            max_retries=self.max_retries,
            is_retryable=is_retryable,
            **fields,
        )

    def complete(
        self,
        *,
        status: Literal["completed", "failed", "cancelled"] = "completed",
        video_url: str | None = None,
        message: str | None = None,
    ) -> int | None:
        if status == "completed":
            self.progress = 100
        return self.publish(
            "complete",
            message or f"Video {status}",
            status=status,
            video_url=video_url,
            progress=self.progress if status == "completed" else None,
        )

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
        body = encode_body(self.video_id, event_type, message, fields)
        terminal = event_type == "complete"
        if terminal:
            self.ended = True
        uid = os.urandom(8).hex()
        if not (OUTBOX.holds(self.video_id) and not OUTBOX.flush()):
            try:
                return self._send(event_type, body, terminal, uid)
            except redis.RedisError as exc:
                log.warning(
                    "event for video %s not published (%s); kept until Redis is back: %s",
                    self.video_id, exc, body.decode(),
                )  # fmt: skip
        metrics.EVENTS_NOT_PUBLISHED.inc()
        OUTBOX.add(Pending(self.video_id, lambda: self._send(event_type, body, terminal, uid)))
        return None

    def _send(self, event_type: EventType, body: bytes, terminal: bool, uid: str) -> int | None:
        """The one round trip; raises redis.RedisError."""
        client = self._client or sync_client()
        if self._script is None:
            self._script = client.register_script(PUBLISH_LUA)
        keys, args = _script_args(self.video_id, body, self.last_seq, terminal, uid)
        seq = int(self._script(keys=keys, args=args, client=client))
        if not seq:  # the video's `complete` is out: the script refused
            self.ended = True
            log.info("event for video %s refused: its complete was published", self.video_id)
            return None
        metrics.EVENTS_PUBLISHED.labels(event_type).inc()
        self.last_seq = seq
        if terminal and self._on_complete is not None:
            self._on_complete(seq)
        return seq


def terminal_event(
    video_id: int,
    seq: int,
    *,
    status: str,
    message: str,
    video_url: str | None = None,
    progress: int | None = None,
) -> bytes:
    """A `complete` event at a known seq, for a stream whose history no longer holds
    the one that was published (the database tells its outcome)."""
    fields = {"status": status, "video_url": video_url, "progress": progress}
    body = encode_body(video_id, "complete", message, fields)
    return b'{"id":"%d","seq":%d,%s' % (seq, seq, body)


HISTORY_LOST = "history_lost"


def history_lost(
    video_id: int,
    after: int,
    resume: int,
    *,
    status: str | None = None,
    progress: int | None = None,
) -> bytes:
    """The notice a stream sends when events a client asks for can no longer be
    replayed (expired, trimmed, or lost by Redis): a `log` event with `code:
    "history_lost"` and, when the caller knows it, the video's state from the database.
    It is this client's alone (never published); its id is where the stream resumes,
    so a reconnect does not ask for the lost events again."""
    skipped = f"events {after + 1}-{resume}" if resume > after else f"events after {after}"
    body: dict[str, Any] = {
        "id": str(resume),
        "seq": resume,
        "video_id": video_id,
        "type": "log",
        "code": HISTORY_LOST,
        "message": f"The stream's {skipped} can no longer be replayed; the current state follows",
        "status": status,
        "progress": progress,
        "timestamp": timestamp(),
    }
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def parse(raw: bytes | str) -> Event:
    event: Event = orjson.loads(raw)
    return event
