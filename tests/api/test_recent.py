"""The video reads of stream authorization, shared by a reconnect storm: one read per
video for every request that wants it at about the same time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kinora.api.recent import RecentTokens, RecentVideos, Viewable
from kinora.core.models import Video
from kinora.core.tokens import hash_token


class CountingLoader:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, video_id: int) -> Viewable | None:
        with self.lock:
            self.calls.append(video_id)
        time.sleep(0.05)  # a database round trip, slowed: requests pile up meanwhile
        if self.fail:
            raise ConnectionError("the database went away")
        return Viewable(Video(id=video_id, user_id=7, prompt="p", cost=0, task_id="t"), 0)


def test_a_thousand_requests_for_ten_videos_read_each_video_once() -> None:
    loader = CountingLoader()
    recent = RecentVideos(ttl=5.0, loader=loader)

    async def main() -> list[Viewable | None]:
        return await asyncio.gather(*(recent.get(n % 10 + 1) for n in range(1000)))

    videos = asyncio.run(main())
    assert sorted(loader.calls) == list(range(1, 11))
    assert [v.video.id for v in videos if v is not None] == [n % 10 + 1 for n in range(1000)]


def test_a_read_older_than_its_ttl_is_read_again() -> None:
    loader = CountingLoader()
    recent = RecentVideos(ttl=0.1, loader=loader)

    async def main() -> None:
        await recent.get(1)
        await recent.get(1)  # fresh: shared
        await asyncio.sleep(0.2)
        await recent.get(1)

    asyncio.run(main())
    assert loader.calls == [1, 1]


def test_a_failed_read_fails_its_waiters_and_is_not_kept() -> None:
    loader = CountingLoader(fail=True)
    recent = RecentVideos(ttl=5.0, loader=loader)

    async def main() -> None:
        results = await asyncio.gather(*(recent.get(1) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        loader.fail = False
        assert (await recent.get(1)) is not None  # read again, not the failure kept

    asyncio.run(main())
    assert loader.calls == [1, 1]


def test_a_waiter_that_goes_away_does_not_cancel_the_others_read() -> None:
    loader = CountingLoader()
    recent = RecentVideos(ttl=5.0, loader=loader)

    async def main() -> None:
        leaving = asyncio.create_task(recent.get(3))
        staying = asyncio.create_task(recent.get(3))
        await asyncio.sleep(0.01)
        leaving.cancel()
        video = await staying
        assert video is not None
        assert video.video.id == 3
        with pytest.raises(asyncio.CancelledError):
            await leaving

    asyncio.run(main())
    assert loader.calls == [3]


def test_a_thousand_streams_opened_with_one_api_token_read_its_owner_once() -> None:
    digests: list[str] = []

    def owner_of(digest: str) -> int | None:
        digests.append(digest)
        time.sleep(0.05)  # a database round trip
        return 7 if digest == hash_token("kin_valid-token-0001") else None

    tokens = RecentTokens(ttl=5.0, loader=owner_of)

    async def main() -> list[int | None]:
        return await asyncio.gather(
            *(tokens.owner("kin_valid-token-0001") for _ in range(1000)),
            tokens.owner("kin_not-a-token-0002"),
        )

    owners = asyncio.run(main())
    assert owners == [7] * 1000 + [None]
    assert len(digests) == 2  # one read each, and by hash: the token is not kept
    assert "kin_valid-token-0001" not in digests
