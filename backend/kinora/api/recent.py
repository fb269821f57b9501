"""The videos streams are opening on, and the API tokens they open with, read from the
database once for every request that wants the same one at about the same time.

When an API process restarts, its clients come back to the others all at once, each
with a token scoped to its video: the signature already says who may watch which
video, and what is left to read (the video's state) is the same for every client of
that video. One read per video (in one thread call) serves every request for it that
arrives while it runs or within `ttl` seconds after: a reconnect storm of ten
thousand clients of ten videos costs a few reads, not ten thousand, each a thread.

A state up to `ttl` old is safe for a stream: ownership never changes, a video that
ended meanwhile has its `complete` in the history the stream replays, and a revocation
reaches a stream opened in that second within seconds all the same (api.grants). An
API token's owner is read the same way (keyed by the token's hash): a user's
thousands of streams opened with the API token cost a read a second, and a rotated
token stops opening streams within `ttl`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from kinora.core.db import session_scope
from kinora.core.models import User, Video, revoked_before_ms
from kinora.core.tokens import hash_token
from kinora.streaming.cancellation import Shared


@dataclass(frozen=True, slots=True)
class Viewable:
    """A video, and the instant before which its owner's scoped tokens are revoked."""

    video: Video
    revoked_before_ms: int


def load(video_id: int) -> Viewable | None:
    with session_scope() as session:
        row = session.execute(
            select(Video, User.tokens_valid_after)
            .join(User, User.id == Video.user_id)
            .where(Video.id == video_id)
        ).first()
        if row is None:
            return None
        video, valid_after = row
        session.expunge(video)  # read-only from here, shared by the requests
        return Viewable(video, revoked_before_ms(valid_after))


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """One read per key shared by every request for it within `ttl` seconds."""

    def __init__(self, ttl: float, loader: Callable[[K], V | None]) -> None:
        self.ttl = ttl
        self.loader = loader
        self.reads = 0  # database reads made (the rest were shared)
        self._entries: dict[K, tuple[float, Shared[V | None]]] = {}

    async def get(self, video_id: K) -> V | None:
        now = asyncio.get_running_loop().time()
        entry = self._entries.get(video_id)
        if entry is None or (entry[1].future.done() and now - entry[0] > self.ttl):
            if len(self._entries) > 10_000:
                self._forget_old(now)
            self.reads += 1
            read = asyncio.ensure_future(run_in_threadpool(self.loader, video_id))
            entry = self._entries[video_id] = (now, Shared(read))
        try:
            # A waiter that goes away does not cancel the others' read.
            return await entry[1].wait()
        except Exception:
            if self._entries.get(video_id) is entry:
                del self._entries[video_id]  # the next request reads again
            raise

    def _forget_old(self, now: float) -> None:
        for video_id, (at, shared) in list(self._entries.items()):
            if shared.future.done() and now - at > self.ttl:
                del self._entries[video_id]


class RecentVideos(Recent[int, Viewable]):
    def __init__(self, ttl: float = 1.0, loader: Callable[[int], Viewable | None] = load) -> None:
        super().__init__(ttl, loader)


def owner_of(digest: str) -> int | None:
    """The id of the user whose API token has this hash; None: no one's (any more)."""
    with session_scope() as session:
        return session.scalar(select(User.id).where(User.token_hash == digest))


class RecentTokens(Recent[str, int]):
    """API tokens' owners, by the token's hash (the token itself is not kept)."""

    def __init__(self, ttl: float = 1.0, loader: Callable[[str], int | None] = owner_of) -> None:
        super().__init__(ttl, loader)

    async def owner(self, token: str) -> int | None:
        return await self.get(hash_token(token))
