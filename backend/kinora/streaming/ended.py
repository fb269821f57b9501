"""The stream of a job its store says has ended (docs/protocol.md §2, "How a stream
ends"): its events after the client's, a page at a time, and always its end: the
`complete` from history, or rebuilt from the store's record (at the seq it recorded)
when Redis no longer holds it; and the repair of an end that was never published."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import cast

import redis

from kinora.streaming.events import Outcome, ending, publish_async, terminal_event
from kinora.streaming.frames import Item
from kinora.streaming.hub import StreamHub
from kinora.streaming.settings import Retention
from kinora.streaming.source import Grant, JobRecord
from kinora.streaming.watcher import LostNotice, resume_point

log = logging.getLogger(__name__)

# A job that ended this recently may still be publishing its last events (its store is
# written first); only after this long is a missing `complete` published for it.
REPAIR_AFTER_SECONDS = 10.0


def outcome(record: JobRecord) -> Outcome:
    assert record.ended
    return cast(Outcome, record.status)


async def find_end(hub: StreamHub, grant: Grant, retention: Retention) -> int | None:
    """The seq of an ended job's `complete`: the store's record, else Redis's; when
    neither has one (it was never published: Redis was down) and the job ended a
    while ago, it is published now and recorded. None: not yet known."""
    record = grant.record
    assert record is not None
    if record.end_seq is not None:
        return record.end_seq
    key = grant.key
    end = await hub.end_seq(key)
    ended_at = record.ended_at or 0.0
    if end is None and time.time() - ended_at > REPAIR_AFTER_SECONDS:
        message, fields = ending(key, outcome(record), reason=record.reason, **record.result)
        # None: someone else published it meanwhile; either way Redis has it now.
        await publish_async(
            hub.redis, key, "complete", message,
            floor=record.last_seq, retention=retention, metrics=hub.metrics, **fields,
        )  # fmt: skip
        end = await hub.end_seq(key)
    if end is not None and grant.store is not None:
        await grant.store.record_end(key, end)
    return end


async def replay(
    hub: StreamHub, grant: Grant, after: int, end: int, lost: LostNotice
) -> AsyncIterator[list[Item]]:
    """An ended job's events after `after`, a page at a time, the last its `complete`
    (from history, or rebuilt at `end`). Raises redis.RedisError."""
    record = grant.record
    assert record is not None
    key = grant.key
    history, counter = await hub.history_state(key, after)
    seen = after
    capped = None if counter is None else min(counter, end - 1)
    resume = resume_point(after, history, capped, end - 1)
    if resume is not None:
        yield [Item(await lost(after, resume), resume, "log")]
        seen = max(seen, resume)
    while history:
        if history[-1].terminal and grant.finish is not None:
            history = [*history[:-1], grant.finish(history[-1])]  # signed now
        yield history
        seen = history[-1].seq
        if history[-1].terminal or len(history) < hub.history_page:
            break
        history = await hub.history(key, seen)
    if seen < end:
        rebuilt = terminal_event(key, end, outcome(record), reason=record.reason, **record.result)
        yield [Item(rebuilt, end, "complete")]


async def frames(
    hub: StreamHub, grant: Grant, after: int, end: int, retry_ms: int, lost: LostNotice
) -> AsyncIterator[bytes]:
    """The SSE body of an ended job's stream: `retry:` and `replay` (its first batch in
    the same write), then the response ends."""
    opening = b"retry: %d\n\n" % retry_ms
    try:
        async for batch in replay(hub, grant, after, end, lost):
            yield b"".join([opening, *[item.sse for item in batch]])
            opening = b""
    except redis.RedisError as exc:
        log.warning("stream of %s ended: Redis unreachable (%s)", grant.key, exc)
        yield b"retry: %d\n\n" % retry_ms
