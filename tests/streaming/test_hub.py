"""StreamHub driven directly against a real Redis: merging history and live events,
concurrent joins, slow clients, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import redis

from kinora.streaming import keys
from kinora.streaming.hub import StreamHub, SubscribeTimeout
from kinora.streaming.logger import SSELogger
from kinora.streaming.sse import frames
from kinora.streaming.watcher import Watcher
from tests.utils.processes import wait_for


def run(
    environment: dict[str, str], body: Callable[[StreamHub], Coroutine[Any, Any, None]]
) -> None:
    """Run `body(hub)` on a fresh event loop with a started hub, bounded to 60 s."""

    async def main() -> None:
        hub = StreamHub(environment["REDIS_URL"], queue_size=64)
        await hub.start()
        try:
            async with asyncio.timeout(60):
                await body(hub)
        finally:
            await hub.stop()

    asyncio.run(main())


async def collect(watcher: Watcher, until: int) -> list[int]:
    seqs: list[int] = []
    async for item in watcher.events():
        seqs.append(item.seq)
        if item.seq >= until:
            break
    return seqs


def test_events_published_while_history_is_read_arrive_once(
    environment: dict[str, str], video_id: int
) -> None:
    """Race: a publisher in another thread publishes without pause while watchers
    join one after another (each reading the history as events keep arriving)."""
    rounds, per_round = 20, 40

    async def body(hub: StreamHub) -> None:
        for r in range(rounds):
            vid = video_id * 100 + r
            started = threading.Event()

            def publish(vid: int = vid, started: threading.Event = started) -> None:
                with SSELogger(keys.video(vid)) as log:
                    for i in range(per_round):
                        log.log(f"event {i}")
                        if i == 3:
                            started.set()

            thread = threading.Thread(target=publish)
            thread.start()
            await asyncio.to_thread(started.wait, 10)
            async with (
                hub.watch(keys.video(vid)) as first,
                hub.watch(keys.video(vid), after=2) as second,
            ):
                watchers = await asyncio.gather(
                    collect(first, per_round), collect(second, per_round)
                )
            await asyncio.to_thread(thread.join, 10)
            assert watchers[0] == list(range(1, per_round + 1)), f"round {r}"
            assert watchers[1] == list(range(3, per_round + 1)), f"round {r}"

    run(environment, body)


def test_watchers_joining_at_the_same_instant_all_receive_every_event(
    environment: dict[str, str], video_id: int
) -> None:
    """The `broadcaster` race: concurrent first subscribers must not overwrite each other."""

    async def body(hub: StreamHub) -> None:
        async def one() -> list[int]:
            async with hub.watch(keys.video(video_id)) as watcher:
                return await collect(watcher, 30)

        tasks = [asyncio.create_task(one()) for _ in range(100)]
        await asyncio.sleep(0)  # every watcher registers before anything is published

        def publish() -> None:
            with SSELogger(keys.video(video_id)) as log:
                for i in range(30):
                    log.log(f"event {i}")

        await asyncio.to_thread(publish)
        results = await asyncio.gather(*tasks)
        assert all(r == list(range(1, 31)) for r in results)
        assert hub.stats()["watchers"] == 0

    run(environment, body)


def test_a_reconnect_storm_shares_history_reads_and_misses_nothing(
    environment: dict[str, str], video_id: int
) -> None:
    """Four hundred watchers of one video come back at once, resuming from a few
    different events, while it keeps publishing: they share a handful of history
    reads, and each still gets every event after its own, once, in order."""
    total = 60

    async def body(hub: StreamHub) -> None:
        key = keys.video(video_id)
        with SSELogger(key) as log:
            for i in range(20):
                log.log(f"event {i}")

        async def one(after: int) -> list[int]:
            async with hub.watch(key, after=after) as watcher:
                return await collect(watcher, total)

        def publish() -> None:
            with SSELogger(key, last_seq=20) as log:
                for i in range(20, total):
                    log.log(f"event {i}")

        publisher = asyncio.create_task(asyncio.to_thread(publish))
        resumes = [10 + n % 4 for n in range(400)]
        results = await asyncio.gather(*(one(after) for after in resumes))
        await publisher
        for after, seqs in zip(resumes, results, strict=True):
            assert seqs == list(range(after + 1, total + 1))
        assert hub.history_reads <= 40, hub.history_reads  # not one per watcher

    run(environment, body)


def test_a_storm_resuming_one_video_asks_redis_for_its_end_once_not_once_each(
    environment: dict[str, str], video_id: int, redis_client: redis.Redis
) -> None:
    """A reconnect storm's clients resuming an unfinished video each ask whether it has
    ended (ProgressCore.sse): one GET on the one command connection per client queued
    10,000 clients past the pool's wait, and the storm's clients got 503s (bench.storm:
    14,953 refused). Shared like history reads, and each still gets the true answer."""
    key = keys.video(video_id)

    def gets() -> int:
        stats: dict[str, Any] = redis_client.info("commandstats")
        return int(stats.get("cmdstat_get", {}).get("calls", 0))

    async def body(hub: StreamHub) -> None:
        before = gets()
        assert await asyncio.gather(*(hub.end_seq(key) for _ in range(1000))) == [None] * 1000
        assert gets() - before <= 20, gets() - before
        redis_client.set(key.end, 7)
        assert await asyncio.gather(*(hub.end_seq(key) for _ in range(100))) == [7] * 100

    run(environment, body)


def test_watchers_whose_subscription_does_not_come_are_refused_in_bounded_time(
    environment: dict[str, str], video_id: int, redis_client: redis.Redis
) -> None:
    """Redis takes the SUBSCRIBE and never confirms it (every client paused): the
    watchers waiting for it are refused (SubscribeTimeout, a 503 to their clients)
    within the hub's subscribe timeout, all of them, however many wait (one timer for
    them all); once Redis answers again, a new watcher streams."""
    key = keys.video(video_id)

    async def body(hub: StreamHub) -> None:
        hub.subscribe_timeout = 0.5

        async def join() -> None:
            async with hub.watch(key):
                pass

        loop = asyncio.get_running_loop()
        redis_client.client_pause(2000)
        try:
            started = loop.time()
            outcomes = await asyncio.gather(*(join() for _ in range(200)), return_exceptions=True)
            waited = loop.time() - started
        finally:
            redis_client.client_unpause()
        assert all(isinstance(o, SubscribeTimeout) for o in outcomes), outcomes[:3]
        assert 0.4 < waited < 1.5, waited
        hub.subscribe_timeout = 5
        with SSELogger(key) as log:
            log.log("after the pause")
        async with hub.watch(key) as watcher:
            assert await collect(watcher, 1) == [1]

    run(environment, body)


def test_each_stream_ends_at_its_own_deadline_however_many_share_a_timer(
    environment: dict[str, str], video_id: int
) -> None:
    """Two hundred watchers of a quiet video, each with its own lifetime between 0.2 and
    0.6 s (StreamHub.deadlines: one timer per tenth of a second, not one each): each
    ends at its deadline, not before and at most a tenth of a second (and the loop's
    slack) after; those that leave early are not woken later."""
    key = keys.video(video_id)

    async def body(hub: StreamHub) -> None:
        loop = asyncio.get_running_loop()

        async def lasts(lifetime: float) -> float:
            async with hub.watch(key) as watcher:
                deadline = loop.time() + lifetime
                async for _ in watcher.batches(deadline):
                    pass
                return loop.time() - deadline

        async def leaves_early() -> None:
            async with hub.watch(key) as watcher:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        async for _ in watcher.batches(loop.time() + 0.3):
                            pass

        lifetimes = [0.2 + 0.4 * n / 200 for n in range(200)]
        late, _ = await asyncio.gather(
            asyncio.gather(*(lasts(t) for t in lifetimes)),
            asyncio.gather(*(leaves_early() for _ in range(50))),
        )
        assert min(late) >= -0.002, min(late)  # (a timer may run a millisecond early)
        assert max(late) < 0.35, max(late)

    run(environment, body)


def test_last_watcher_leaving_unsubscribes(
    environment: dict[str, str], video_id: int, redis_client: redis.Redis
) -> None:
    channel = f"video:{video_id}"

    def numsub() -> int:
        return int(redis_client.pubsub_numsub(channel)[0][1])

    async def body(hub: StreamHub) -> None:
        async with hub.watch(keys.video(video_id)), hub.watch(keys.video(video_id)):
            assert numsub() == 1
        await asyncio.to_thread(wait_for, "unsubscribe", lambda: numsub() == 0, 5)
        assert hub.stats() == {"videos": 0, "watchers": 0, "slow_cuts": 0}
        # and a new watcher subscribes again
        async with hub.watch(keys.video(video_id)):
            assert numsub() == 1

    run(environment, body)


def test_a_client_too_slow_to_keep_up_is_cut_off_and_resumes(
    environment: dict[str, str], video_id: int
) -> None:
    async def body(hub: StreamHub) -> None:
        async with hub.watch(keys.video(video_id)) as slow:
            stream = slow.events()
            await asyncio.to_thread(publish_n, video_id, 1)
            first = await anext(stream)
            # then it stops reading while 200 events arrive (its queue holds 64)
            await asyncio.to_thread(publish_n, video_id, 200)
            await asyncio.to_thread(wait_for, "the cut", lambda: slow.cut, 5)
            rest = [item.seq async for item in stream]
            assert len(slow.topic.log) <= 2 * 64  # memory stayed bounded
        assert hub.stats() == {"videos": 0, "watchers": 0, "slow_cuts": 1}
        assert first.seq == 1
        assert rest == []  # ends at once: the client reconnects with Last-Event-ID
        async with hub.watch(keys.video(video_id), after=first.seq) as resumed:
            assert await collect(resumed, 201) == list(range(2, 202))

    run(environment, body)


def test_subscriber_reconnect_fills_the_gap_from_history(
    environment: dict[str, str], video_id: int, redis_client: redis.Redis
) -> None:
    async def body(hub: StreamHub) -> None:
        async with hub.watch(keys.video(video_id)) as watcher:
            await asyncio.to_thread(publish_n, video_id, 5)
            seqs = [item.seq async for item in take(watcher.events(), 5)]
            # Drop the hub's subscriber connection, publish while it is gone.
            redis_client.client_kill_filter(_type="pubsub")
            await asyncio.to_thread(publish_n, video_id, 5)
            seqs += [item.seq async for item in take(watcher.events(), 5)]
        assert seqs == list(range(1, 11))

    run(environment, body)


def test_stream_ends_at_its_lifetime_and_resumes_without_loss(
    environment: dict[str, str], video_id: int
) -> None:
    """SSE_TIMEOUT_SECONDS: the response ends; the client resumes with Last-Event-ID."""

    async def body(hub: StreamHub) -> None:
        await asyncio.to_thread(publish_n, video_id, 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks = [c async for c in frames(hub, keys.video(video_id), 0, 3000, lifetime=0.5)]
        assert loop.time() - started >= 0.5  # it lived its lifetime, then ended by itself
        # `retry:` first, in the same chunk (one write) as the history
        assert chunks[0].startswith(b"retry: 3000\n\nid: 1\n")
        assert ids(chunks) == [b"id: 1", b"id: 2", b"id: 3"]
        await asyncio.to_thread(publish_n, video_id, 2)
        resumed = [c async for c in frames(hub, keys.video(video_id), 3, 3000, lifetime=0.5)]
        assert resumed[0].startswith(b"retry: 3000\n\nid: 4\n")
        assert ids(resumed) == [b"id: 4", b"id: 5"]

    run(environment, body)


def ids(chunks: list[bytes]) -> list[bytes]:
    """The `id:` lines of SSE frames, however they were batched into writes."""
    return [line for line in b"".join(chunks).split(b"\n") if line.startswith(b"id: ")]


def publish_n(video_id: int, n: int) -> None:
    with SSELogger(keys.video(video_id)) as log:
        for i in range(n):
            log.log(f"event {i}")


async def take(source: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    if n <= 0:
        return
    count = 0
    async for item in source:
        yield item
        count += 1
        if count >= n:
            return


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Any:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before + 1
