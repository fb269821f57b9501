"""The one event format, and publishing it (docs/protocol.md §2); `SSELogger` is in `logger`.

Every event of a job (streaming.keys: any job, or one of Kinora's videos) gets the
job's next `seq`, is added to its history (a sorted set scored by `seq`, capped,
expiring) and is published on its channel (`video:<id>`), all in ONE round trip by
a Lua script. Why a script and not MULTI: the `seq` must be written into the JSON
that is stored and published, and a MULTI cannot use the result of its INCR inside
the same transaction, so it would need a second round trip (or WATCH and retries).
Redis functions would also do, but need Redis 7 and the embedded server is Redis 6.2;
`EVALSHA` works on both.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import UTC, datetime
from typing import Any, Literal, NotRequired, TypedDict

import orjson
import redis
import redis.asyncio

from kinora.core import logs
from kinora.streaming.keys import StreamKey
from kinora.streaming.metrics import StreamMetrics
from kinora.streaming.settings import Retention

log = logging.getLogger(__name__)

EventType = Literal["log", "progress", "stage", "error", "complete"]
Stage = Literal["preparing", "generating", "finalizing"]


class Event(TypedDict):
    """An event as it travels: JSON on the wire, this shape once parsed."""

    id: str
    seq: int
    video_id: NotRequired[int]  # Kinora's videos
    job_id: NotRequired[str | int]  # any other job (streaming.keys)
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
    retry_in_seconds: NotRequired[float]
    trace_id: NotRequired[str]
    video_url: NotRequired[str]
    code: NotRequired[str]
    current: NotRequired[int]
    total: NotRequired[int]


# When Redis has lost a video's counter (flushed, restarted empty, failed over), its
# next event is numbered this far above the floor the publisher knows (the database's
# record lags the true last seq by the few events since its last write), so no seq a
# client has seen is ever used again (README, Faults). Watchers are told of the gap.
SEQ_JUMP_AFTER_LOSS = 100

# KEYS: seq, history, end, sent. ARGV: body (the event's JSON without its opening
# brace), channel, history cap, retention seconds, floor (the highest seq the publisher
# knows was used), "1" if this is the `complete` event, the event's unique id, "1" to
# publish on the channel's shard (SPUBLISH: a Redis Cluster) rather than to every
# subscriber of the server (PUBLISH). Returns
# the new seq; the seq it already has when the same event is sent again (a call that
# timed out may still have run: the outbox's resend must not publish it twice: the ids
# of the newest events, as many as the history keeps, are remembered); 0 when
# the video's `complete` was published already: nothing is published after it.
PUBLISH_LUA = (
    """
local prior = redis.call('ZSCORE', KEYS[4], ARGV[7])
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
-- Keep the newest ARGV[3] events (a no-op while there are fewer).
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[4], seq, ARGV[7])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -1 - tonumber(ARGV[3]))
-- The retention is renewed every 16th event, at the end, and whenever a key has
-- none (the first event, or after Redis lost data): three fewer calls per event.
if seq % 16 == 1 or ARGV[6] == '1' or redis.call('TTL', KEYS[2]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
if ARGV[8] == '1' then
  redis.call('SPUBLISH', ARGV[2], data)
else
  redis.call('PUBLISH', ARGV[2], data)
end
return seq
"""
)


PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()  # noqa: S324 (Redis's script id)


# Fields that are sent as null rather than left out: a stage event always says what
# the previous stage was, `null` for the first.
KEEP_NULL = frozenset({"previous_stage"})


def timestamp() -> str:
    """UTC, to the millisecond: 2026-11-22T10:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def encode_body(
    key: StreamKey, event_type: EventType, message: str, fields: dict[str, Any]
) -> bytes:
    """The event JSON minus `{"id":…,"seq":…,` which the script prepends. It carries
    the trace id of the request or job publishing it, when there is one."""
    if "trace_id" not in fields and (trace_id := logs.current_trace_id()):
        fields = {**fields, "trace_id": trace_id}
    body = {
        key.id_field: key.id,
        "type": event_type,
        "message": message,
        **{k: v for k, v in fields.items() if v is not None or k in KEEP_NULL},
        "timestamp": timestamp(),
    }
    return orjson.dumps(body)[1:]


def script_args(
    key: StreamKey,
    body: bytes,
    floor: int,
    terminal: bool,
    retention: Retention,
    uid: str | None = None,
    *,
    sharded: bool = False,
) -> tuple[list[str], list[Any]]:
    """The publishing script's keys and arguments. `sharded`: on a Redis Cluster."""
    keys = [key.seq, key.history, key.end, key.sent]
    args: list[Any] = [
        body,
        key.channel,
        retention.history_max,
        retention.seconds,
        floor,
        "1" if terminal else "0",
        uid or os.urandom(8).hex(),
        "1" if sharded else "0",
    ]
    return keys, args


async def publish_async(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
    key: StreamKey,
    event_type: EventType,
    message: str,
    *,
    retention: Retention,
    floor: int = 0,
    metrics: StreamMetrics | None = None,
    **fields: Any,
) -> int | None:
    """Publish one event from async code (the API). Returns its seq, or None if the
    job's `complete` was published already (then nothing is)."""
    body = encode_body(key, event_type, message, fields)
    sharded = isinstance(client, redis.asyncio.RedisCluster)
    keys, args = script_args(key, body, floor, event_type == "complete", retention, sharded=sharded)
    script = client.register_script(PUBLISH_LUA)
    seq = int(await script(keys=keys, args=args))
    if not seq:
        return None
    (metrics or StreamMetrics.of()).published(event_type).inc()
    return seq


Outcome = Literal["completed", "failed", "cancelled"]


def ending(
    key: StreamKey, status: Outcome, *, reason: str | None = None, **fields: Any
) -> tuple[str, dict[str, Any]]:
    """The message and fields of a `complete` event (docs/protocol.md §2). Every place that
    ends a stream builds it here: the worker's logger, the API's cancel and its failed
    submit, the sweeper's timeout, and a stream rebuilding an end Redis lost. `fields`
    (a completed video's `video_url`, say) go with a completed job only."""
    what = key.kind.capitalize()
    if status == "completed":
        return f"{what} completed", {"status": status, **fields, "progress": 100}
    if status == "failed":
        return f"{what} failed: {reason or 'unknown error'}", {"status": status}
    return f"{what} cancelled" + (f": {reason}" if reason else ""), {"status": status}


def terminal_event(
    key: StreamKey, seq: int, status: Outcome, *, reason: str | None = None, **fields: Any
) -> bytes:
    """A `complete` event at a known seq, for a stream whose history no longer holds
    the one that was published (the database tells its outcome)."""
    message, complete = ending(key, status, reason=reason, **fields)
    body = encode_body(key, "complete", message, complete)
    return b'{"id":"%d","seq":%d,%s' % (seq, seq, body)


HISTORY_LOST = "history_lost"


def history_lost(
    key: StreamKey,
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
        key.id_field: key.id,
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
