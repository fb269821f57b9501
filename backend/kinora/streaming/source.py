"""The seams between the progress core and its host (docs/library.md, "Hosts").

A host tells the core, for each connection, which job it may watch and what the host
knows of it (a JobSource's `grant`); where a job's floor and outcome are kept durably
is a Store. Kinora's videos are a JobSource and a Store on its own tables
(kinora.api.stream); a library host gives `progress_router` an `authorize` hook and,
for the same promises as Kinora's videos, a store (kinora.streaming.sqlstore).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import HTTPConnection

from kinora.streaming.access import Access
from kinora.streaming.events import history_lost
from kinora.streaming.keys import StreamKey
from kinora.streaming.sse import Finish

OUTCOMES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What a store knows of a job: its state, the highest seq known used (`last_seq`,
    the floor no new event goes below) and, once it ended, its outcome and the seq of
    its `complete` (`end_seq`, when recorded)."""

    status: str = "pending"
    progress: int = 0
    last_seq: int = 0
    end_seq: int | None = None
    reason: str | None = None  # why it failed or was cancelled
    ended_at: float | None = None  # when it ended (epoch seconds)
    result: Mapping[str, Any] = field(default_factory=dict)  # a completed job's fields

    @property
    def ended(self) -> bool:
        return self.status in OUTCOMES


class Store(Protocol):
    """Where a job's floor and outcome live durably (Redis may lose them)."""

    async def load(self, key: StreamKey) -> JobRecord | None:
        """The job's record; None when the store has none."""
        ...

    async def record_end(self, key: StreamKey, seq: int) -> None:
        """The job's `complete` was published at `seq` (a stream published it again
        when Redis had lost it)."""
        ...


@dataclass(slots=True)
class Grant:
    """One connection's leave to watch one job, and what the host adds to its stream."""

    key: StreamKey
    # The WebSocket's `connected` fields: `{"job_id": …}` unless the host says.
    hello: dict[str, Any] | None = None
    # The store's record when the connection was made (None: no store, or no record).
    record: JobRecord | None = None
    store: Store | None = None
    access: Access | None = None  # ends the stream when its token expires or is revoked
    finish: Finish | None = None  # makes the `complete` as it is sent (a fresh URL)
    lease: contextlib.AbstractContextManager[Any] | None = None  # held while it runs
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def floor(self) -> int:
        return self.record.last_seq if self.record else 0


class lost_notice:
    """Builds the `history_lost` notice (docs/protocol.md §2) with the job's state as its
    store has it, read when it is needed (rarely: Redis lost data, or the history
    expired). (A class, not a closure: every open stream holds one.)"""

    __slots__ = ("key", "store")

    def __init__(self, key: StreamKey, store: Store | None) -> None:
        self.key, self.store = key, store

    async def __call__(self, after: int, resume: int) -> bytes:
        record = await self.store.load(self.key) if self.store is not None else None
        if record is None:
            return history_lost(self.key, after, resume)
        return history_lost(self.key, after, resume, status=record.status, progress=record.progress)


@dataclass(slots=True)
class Follow:
    """The announcements of the jobs a caller submits while its stream is open: their
    key (each event names a new job in `job`), where the stream starts in them, and the
    leave to watch an announced job (None: not the caller's)."""

    key: StreamKey
    after: int
    grant: Callable[[str], Awaitable[Grant | None]]


@dataclass(slots=True)
class Watch:
    """One connection's leave to watch several jobs at once (docs/protocol.md §6)."""

    grants: list[Grant]
    follow: Follow | None = None  # the caller's new jobs join the stream
    access: Access | None = None
    lease: contextlib.AbstractContextManager[Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


# Where a many-jobs stream starts in a job's announcements: their counter now.
Since = Callable[[StreamKey], Awaitable[int]]


class JobSource(Protocol):
    """Authorizes a connection (an HTTP request or a WebSocket) to watch a job: returns
    its Grant, or raises starlette's HTTPException (401, 404; 429 for a full quota)."""

    async def grant(self, connection: HTTPConnection, job_id: str) -> Grant: ...

    async def watch_many(
        self,
        connection: HTTPConnection,
        job_ids: Sequence[str],
        resume: Mapping[str, int],
        since: Since,
    ) -> Watch:
        """Leave to watch `job_ids` (each the caller's, or the whole request is a 404);
        none listed: what the source follows for the caller (or a 422 if nothing).
        `resume` is the client's cursor (kinora.streaming.cursor); `since` reads where
        announcements stand, before the source lists what it follows."""
        ...
