"""StreamHub: one Redis subscriber per API process, fanned out to every watcher.

A watcher registers for a video, then (once the channel's subscription is live)
reads the video's history after its last seen `seq`, then the live events; both
are merged by `seq`, so an event published while the history is being read
arrives exactly once. A video's live events are kept once, in a bounded log its
watchers hold cursors into, and each watcher takes everything new in one batch
(one write to its client however many events arrived); a watcher that falls more
than `queue_size` events behind is cut off (it resumes with `Last-Event-ID`)
instead of holding memory.

Order of operations matters (each a trap seen in shared-subscriber libraries):
- register first, then subscribe, so concurrent first watchers of a channel all
  receive its events (the `broadcaster` race);
- subscribe, then read history, so nothing published in between is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from kinora.streaming import connect
from kinora.streaming.cancellation import Shared, raise_if_cancelled
from kinora.streaming.frames import RESYNC, Item
from kinora.streaming.keys import StreamKey
from kinora.streaming.metrics import StreamMetrics
from kinora.streaming.presence import Presence
from kinora.streaming.shards import Shards
from kinora.streaming.watcher import (
    HISTORY_PAGE,
    Deadlines,
    Drain,
    LostNotice,
    Pacer,
    Topic,
    Watcher,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


DELIVERY_FLUSH_SECONDS = 1.0
# The hub pings Redis this often; without an answer for PROBE_STALE_SECONDS, new
# streams are refused with a 503 (open ones end with a `retry:` on their own).
PROBE_SECONDS = 0.5
# The command pool's connections (history, presence, rate limit, publish): one. With
# history reads shared by the watchers that ask the same, a second one did not open
# streams faster, even in a storm of 10,000 clients over 1,000 videos (bench.storm:
# 6.5 s with one, 7.0 s with two), and the API keeps to three Redis connections
# (this one, the subscriber, and one to queue jobs: kinora.jobs.dispatch).
COMMAND_CONNECTIONS = 1
PROBE_STALE_SECONDS = 2.5
PROBE_RECHECK_SECONDS = 0.5
# Quiet topics whose store is asked at once (each a database read in a thread).
RECHECKS_AT_ONCE = 4

# Told of a topic with no event for a while: (its key, its watchers' store).
OnQuiet = Callable[[StreamKey, Any], Awaitable[None]]


class SubscribeTimeout(RuntimeError):
    pass


DRAIN_REASONS: dict[Drain, str] = {
    "shutdown": "shutting down",
    "redis": "Redis does not answer",
    "expired": "access expired",
    "revoked": "access revoked",
}


class StreamHub:
    """Owns one pub/sub connection and one small command pool for history reads."""

    def __init__(
        self,
        redis_url: str,
        *,
        queue_size: int = 256,
        subscribe_timeout: float = 10.0,
        presence_ttl: float = 15.0,
        history_page: int = HISTORY_PAGE,
        metrics: StreamMetrics | None = None,
        pacer: Pacer | None = None,
        recheck_idle: float = 10.0,
        on_quiet: OnQuiet | None = None,
    ) -> None:
        self.redis_url = redis_url
        # Every `recheck_idle` seconds, each topic without an event since the last look
        # whose watchers gave a store is handed to `on_quiet` (the core's: did its job
        # end while its last events were lost?).
        self.recheck_idle = recheck_idle
        self.on_quiet = on_quiet
        self.metrics = metrics or StreamMetrics.of()
        # Wakes this hub's watchers in slices (watcher.Pacer); the core's streams take
        # their turn on it too.
        self.pacer = pacer or Pacer()
        self.history_page = history_page
        self.queue_size = queue_size
        self.subscribe_timeout = subscribe_timeout
        self.slow_cuts = 0
        self.closing = False  # shutting down: a new watcher ends at once
        self._last_pong = float("-inf")
        self._topics: dict[bytes, Topic] = {}
        # SUBSCRIBEs sent whose confirmation has not come back, per channel.
        self._pending: defaultdict[bytes, int] = defaultdict(int)
        self._ops: asyncio.Queue[tuple[Literal["sub", "unsub"], bytes]] = asyncio.Queue()
        # History reads not yet sent, by (history key, after): see history_state. At
        # most COMMAND_CONNECTIONS are sent at once.
        self._reads: dict[tuple[str, int], Shared[Any]] = {}
        self._read_slots = asyncio.Semaphore(COMMAND_CONNECTIONS)
        self.history_reads = 0  # first pages read (each shared by the watchers that joined)
        self._tasks: list[asyncio.Task[None]] = []
        self.delivered: dict[str, int] = {"sse": 0, "websocket": 0}
        # Commands (history, presence, publish) on COMMAND_CONNECTIONS; the subscriber
        # on a connection of its own: two connections per process in all. The request
        # paths refuse at once while the probe says Redis does not answer.
        self.redis: aioredis.Redis = connect.commands(redis_url, COMMAND_CONNECTIONS)
        where = connect.topology(redis_url)
        # On a Redis Cluster, a subscriber per shard (SSUBSCRIBE: kinora.streaming.shards).
        self._shards: Shards | None = None
        if where.cluster:
            self._shards = Shards(
                cast(aioredis.RedisCluster, self.redis),
                self._dispatch,
                username=where.username,
                password=where.password,
                **({"ssl": True} if where.tls else {}),
            )
        else:
            self._subscriber: aioredis.Redis = connect.subscriber(redis_url)
            self._pubsub: PubSub = self._subscriber.pubsub()
        self.presence = Presence(self.redis, presence_ttl)
        self.deadlines = Deadlines()  # the streams' lifetimes and tokens' expiries

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the hub's tasks. Redis need not answer yet: the host app starts all the
        same (docs/library.md), streams are a 503 with Retry-After until Redis answers, and
        the subscriber connects when it can (`_listen`)."""
        try:
            async with asyncio.timeout(connect.ASYNC_TIMEOUT):
                if self._shards is not None:
                    await self._shards.start()
                    await self.redis.ping()
                else:
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]
            self._last_pong = asyncio.get_running_loop().time()
        except (TimeoutError, redis.RedisError, OSError) as exc:
            log.warning("Redis does not answer yet (%s): streams wait for it (503)", exc)
        await self.presence.start()
        self._tasks = [
            asyncio.create_task(self._control(), name="hub-control"),
            asyncio.create_task(self._count_deliveries(), name="hub-metrics"),
            asyncio.create_task(self._probe(), name="hub-probe"),
        ]
        if self._shards is None:
            self._tasks.append(asyncio.create_task(self._listen(), name="hub-listen"))
        if self.on_quiet is not None:
            self._tasks.append(asyncio.create_task(self._recheck_quiet(), name="hub-recheck"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.flush_deliveries()
        await self.presence.stop()
        if self._shards is not None:
            await self._shards.stop()
        else:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            await connect.close(self._subscriber)
        await connect.close(self.redis)

    # -- watching -------------------------------------------------------------------

    def watch(
        self,
        key: StreamKey,
        after: int = 0,
        transport: str = "sse",
        *,
        floor: int = 0,
        lost: LostNotice | None = None,
        store: object | None = None,
    ) -> Watching:
        """`async with` it: a watcher of `key` that has seen every event up to `after`,
        registered while the block runs. `floor`: the highest seq known used (a
        database's record); `lost` builds the `history_lost` notice when events it asks
        for are gone; `store`: where the job's record is kept (looked at again while
        the topic is quiet: `on_quiet`)."""
        return Watching(self, key, after, transport, floor, lost, store)

    def detach(self, watcher: Watcher) -> None:
        """Forget a watcher; the last one of a video unsubscribes. Never awaits, so it
        is safe in a cancelled stream's cleanup."""
        name = watcher.key.channel.encode()
        topic = self._topics.get(name)
        if topic is None or watcher not in topic.watchers:
            return
        topic.watchers.discard(watcher)
        self.presence.left(watcher.key)
        if not topic.watchers:
            del self._topics[name]
            self._ops.put_nowait(("unsub", name))

    def drain(self, why: Drain = "shutdown", spread: float = 0.0) -> int:
        """End every watcher's stream; each client is told to come back: to another
        process (`shutdown`), or once Redis answers again (`redis`). `spread`: each
        ends at a random moment within that many seconds, so the clients do not come
        back in one burst. After a `shutdown`, a watcher that joins ends at once.
        Returns how many were told."""
        if why == "shutdown":
            self.closing = True
        watchers = [w for topic in self._topics.values() for w in topic.watchers]
        if spread > 0:
            loop = asyncio.get_running_loop()
            for watcher in watchers:
                loop.call_later(random.uniform(0, spread), watcher.end, why)
        else:
            for watcher in watchers:
                watcher.end(why)
        if watchers:
            log.info(
                "%s: %d streams told to reconnect%s", DRAIN_REASONS[why], len(watchers),
                f" over {spread:g} s" if spread > 0 else "",
            )  # fmt: skip
        return len(watchers)

    @property
    def watching(self) -> int:
        """Watchers registered now (SSE and WebSocket)."""
        return sum(len(topic.watchers) for topic in self._topics.values())

    async def history(self, key: StreamKey, after: int, limit: int | None = None) -> list[Item]:
        """At most `limit` (a page) events after seq `after`, oldest first."""
        raw = await self._page(self.redis, key, after, limit)
        return [Item.from_raw(r) for r in cast(list[bytes], raw)]

    def _page(self, client: Any, key: StreamKey, after: int, limit: int | None = None) -> Any:
        """ZRANGEBYSCORE of one page after `after`, on a client or a pipeline."""
        num = limit or self.history_page
        return client.zrangebyscore(key.history, f"({after}", "+inf", start=0, num=num)

    async def history_state(self, key: StreamKey, after: int) -> tuple[list[Item], int | None]:
        """The first page of history after `after`, and the video's seq counter (None if
        Redis has none), in one round trip.

        Shared: every watcher that asks for the same before the read is sent joins it
        (the clients of a video coming back together, a reconnect storm, mostly resume
        from the same event: one read, not one each, queued on the command connection). A
        read is joined only until it is sent, so it is always sent after the watcher
        registered: nothing published before that is missed."""
        return await self._joined((key.history, after), lambda: self._read_state(key, after))

    async def _read_state(self, key: StreamKey, after: int) -> tuple[list[Item], int | None]:
        self.history_reads += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            self._page(pipe, key, after)
            pipe.get(key.seq)
            raw, counter = await pipe.execute()
        items = [Item.from_raw(r) for r in cast(list[bytes], raw)]
        return items, None if counter is None else int(counter)

    async def end_seq(self, key: StreamKey) -> int | None:
        """The seq of the video's `complete` event, if Redis still knows it. Shared as
        history reads are: a storm's clients resuming a video ask it once, not once each."""
        value = await self._joined((key.end, 0), lambda: self.redis.get(key.end))
        return None if value is None else int(value)

    async def _joined(self, flight: tuple[str, int], read: Callable[[], Awaitable[T]]) -> T:
        """`read()`, or the same read that another caller started and that has not been
        sent yet: joined only until it is sent, so it is always sent after the caller
        asked. At most COMMAND_CONNECTIONS reads are in flight."""
        shared = self._reads.get(flight)
        if shared is None:
            future = asyncio.ensure_future(self._send(flight, read))
            shared = self._reads[flight] = Shared(future)
            future.add_done_callback(lambda f: self._landed(flight, f))
        # A watcher that goes away does not cancel the others' read.
        return cast(T, await shared.wait())

    async def _send(self, flight: tuple[str, int], read: Callable[[], Awaitable[T]]) -> T:
        async with self._read_slots:
            del self._reads[flight]  # sent now: later callers start a read of their own
            return await read()

    def _landed(self, flight: tuple[str, int], future: asyncio.Future[Any]) -> None:
        shared = self._reads.get(flight)
        if shared is not None and shared.future is future:  # cancelled before it was sent
            del self._reads[flight]
        if not future.cancelled() and future.exception() is None:
            self._last_pong = asyncio.get_running_loop().time()  # Redis answers

    async def recent(self, key: StreamKey, count: int) -> list[Item]:
        """The last `count` events of a video's history, oldest first."""
        raw = await self.redis.zrange(key.history, -count, -1)
        return [Item.from_raw(r) for r in cast(list[bytes], raw)]

    @property
    def redis_reachable(self) -> bool:
        """Whether Redis answered a PING lately: a new stream is refused at once (503)
        while it does not, rather than opened to wait for a subscription that cannot
        come. A paused Redis stops answering: within PROBE_STALE_SECONDS it shows."""
        return asyncio.get_running_loop().time() - self._last_pong < PROBE_STALE_SECONDS

    async def reachable(self) -> bool:
        """`redis_reachable`, and when it says no, one quick PING of our own (0.5 s at
        most): the first request after Redis came back need not wait for the probe."""
        if self.redis_reachable:
            return True
        try:
            async with asyncio.timeout(PROBE_RECHECK_SECONDS):
                await self.redis.ping()
        except (TimeoutError, redis.RedisError, OSError):
            return False
        self._last_pong = asyncio.get_running_loop().time()
        return True

    async def _probe(self) -> None:
        while True:
            # A cancel that lands inside redis-py's command can be swallowed there; the
            # task still knows it is being cancelled (kinora.streaming.cancellation).
            raise_if_cancelled()
            try:
                await self.redis.ping()
                self._last_pong = asyncio.get_running_loop().time()
            except (redis.RedisError, OSError):
                if not self.redis_reachable:
                    # Redis refuses or times out, and has not answered anything for
                    # PROBE_STALE_SECONDS (a busy event loop alone never gets here):
                    # open streams would only send heartbeats until it is back, so they
                    # end with a `retry:` now and resume with Last-Event-ID (README, Faults).
                    self.drain("redis")
            await asyncio.sleep(PROBE_SECONDS)

    async def _count_deliveries(self) -> None:
        while True:
            await asyncio.sleep(DELIVERY_FLUSH_SECONDS)
            self.flush_deliveries()

    def flush_deliveries(self) -> None:
        """Deliveries are counted in plain ints on the event path and added to the
        Prometheus counter once a second: with metric files shared between processes
        each increment is a locked write, and one a client write cost 15 % of the
        API's CPU under fan-out (bench.fanout)."""
        for transport, count in self.delivered.items():
            if count:
                self.metrics.deliveries.labels(transport).inc(count)
                self.delivered[transport] = 0

    def stats(self) -> dict[str, Any]:
        return {
            "videos": len(self._topics),
            "watchers": sum(len(t.watchers) for t in self._topics.values()),
            "slow_cuts": self.slow_cuts,
        }

    def resync(self, key: StreamKey) -> None:
        """The watchers of `key` read its history again after what each has (events
        may have been published that its subscriber never heard)."""
        topic = self._topics.get(key.channel.encode())
        if topic is not None:
            for watcher in topic.append(RESYNC, self.queue_size):
                watcher.cut_off()

    async def _recheck_quiet(self) -> None:
        """A job can end without its stream hearing it: its worker recorded the outcome,
        then died with its last events unpublished (Redis was failing over). A topic
        that heard nothing for a whole round is handed to `on_quiet`, a few at once,
        every round while it stays quiet."""
        assert self.on_quiet is not None
        slots = asyncio.Semaphore(RECHECKS_AT_ONCE)
        asking: dict[bytes, asyncio.Task[None]] = {}  # one question per topic at a time

        async def ask(name: bytes, key: StreamKey, store: object) -> None:
            try:
                async with slots:
                    await self.on_quiet(key, store)  # type: ignore[misc]
            except Exception as exc:  # Redis or the store away: the next round
                log.info("a quiet stream of %s not checked (%r)", key, exc)
            finally:
                asking.pop(name, None)

        try:
            while True:
                await asyncio.sleep(self.recheck_idle)
                for name, topic in list(self._topics.items()):
                    quiet = topic.heard == topic.end
                    topic.heard = topic.end
                    if quiet and topic.store is not None and topic.watchers and name not in asking:
                        key = next(iter(topic.watchers)).key
                        asking[name] = asyncio.create_task(ask(name, key, topic.store))
        finally:
            for task in list(asking.values()):
                task.cancel()

    # -- the two hub tasks ------------------------------------------------------------

    async def _control(self) -> None:
        """Sends SUBSCRIBE/UNSUBSCRIBE in the order they were asked for, batching runs
        of the same kind (many watchers joining at once cost one command)."""
        while True:
            raise_if_cancelled()
            ops = [await self._ops.get()]
            while not self._ops.empty():
                ops.append(self._ops.get_nowait())
            for op, run in itertools.groupby(ops, key=lambda o: o[0]):
                names = [name for _, name in run]
                subscriber: Shards | PubSub = self._shards or self._pubsub
                try:
                    if op == "sub":
                        await subscriber.subscribe(*names)
                    else:
                        await subscriber.unsubscribe(*names)
                except Exception:
                    log.exception("redis %s of %d channels failed; retrying", op, len(names))
                    await asyncio.sleep(0.5)
                    for name in names:
                        self._ops.put_nowait((op, name))

    async def _listen(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                if self._pubsub.connection is None:  # Redis did not answer at start
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # redis-py reconnects on the next read and resubscribes every channel;
                # `_dispatch` then tells the watchers to re-read history.
                log.warning("redis subscriber connection lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        name: bytes = message["channel"]
        if kind == "message":
            topic = self._topics.get(name)
            if topic is not None:
                for watcher in topic.append(Item.from_raw(message["data"]), self.queue_size):
                    watcher.cut_off()
        elif kind == "subscribe":
            pending = max(0, self._pending.get(name, 0) - 1)
            if pending:
                self._pending[name] = pending
            else:
                self._pending.pop(name, None)
            topic = self._topics.get(name)
            if topic is None or pending:
                return
            if topic.ready.is_set():
                # A re-subscription after a reconnect: events may have been missed.
                for watcher in topic.append(RESYNC, self.queue_size):
                    watcher.cut_off()
            else:
                topic.mark_ready()


class Watching:
    """StreamHub.watch's context. (A class, not a generator: every open stream holds
    one, and a generator's frame is several times its size.)"""

    __slots__ = ("after", "clients", "floor", "hub", "key", "lost", "store", "transport", "watcher")

    def __init__(
        self,
        hub: StreamHub,
        key: StreamKey,
        after: int,
        transport: str,
        floor: int,
        lost: LostNotice | None,
        store: object | None,
    ) -> None:
        self.hub, self.key, self.after, self.transport = hub, key, after, transport
        self.floor, self.lost, self.store = floor, lost, store
        self.watcher: Watcher | None = None
        self.clients: Any = None

    async def __aenter__(self) -> Watcher:
        hub, key = self.hub, self.key
        name = key.channel.encode()
        topic = hub._topics.get(name)
        if topic is None:
            topic = hub._topics[name] = Topic(hub.pacer)
            hub._pending[name] += 1
            hub._ops.put_nowait(("sub", name))
        if self.store is not None:
            topic.store = self.store
        watcher = self.watcher = Watcher(
            hub, key, topic, self.after, self.transport, floor=self.floor, lost=self.lost
        )
        topic.watchers.add(watcher)  # registered before the subscription can go live
        if hub.closing:
            watcher.end("shutdown")  # its history, then a `retry:` towards another process
        hub.presence.joined(key)
        self.clients = hub.metrics.clients.labels(self.transport)
        self.clients.inc()
        try:
            # (most watchers join a channel already live)
            if not topic.ready.is_set() and not await topic.until_ready(hub.subscribe_timeout):
                raise SubscribeTimeout(f"no subscription to {name.decode()} from Redis")
        except BaseException:
            self._leave()
            raise
        return watcher

    async def __aexit__(self, *exc: object) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.watcher is not None:
            self.clients.dec()
            self.hub.detach(self.watcher)
            self.watcher = None
