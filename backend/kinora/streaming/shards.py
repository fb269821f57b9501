"""Sharded pub/sub on a Redis Cluster: the hub's subscriber when REDIS_URL is a
`redis+cluster://` URL (kinora.streaming.connect).

A job's events are SPUBLISHed on the shard that owns its channel's slot (its keys
share that slot: kinora.streaming.keys), so each shard carries only its own jobs'
events, where a classic PUBLISH on a cluster is copied to every node. The hub
SSUBSCRIBEs each channel on the primary that owns it: one connection per primary, one
SSUBSCRIBE per slot (Redis refuses one that spans slots), one reading task per
connection.

When a shard's primary goes away (killed: its replica is promoted) or a slot moves
(the server then drops the subscriptions: `sunsubscribe`), the channels it carried
are routed again: the cluster's slot map is read anew and each channel is subscribed
on its slot's primary now, every REROUTE_SECONDS until it takes. The confirmation of
a channel subscribed again tells the hub its watchers may have missed events (they
read the history again), as a reconnect of the one-server subscriber does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from kinora.streaming.cancellation import raise_if_cancelled

log = logging.getLogger(__name__)

REROUTE_SECONDS = 0.5
CONNECT_TIMEOUT = 2.0

Deliver = Callable[[dict[str, Any]], None]


class Shard:
    """One primary's SSUBSCRIBE connection and the task that reads it."""

    def __init__(self, name: str, client: aioredis.Redis) -> None:
        self.name = name
        self.client = client
        self.pubsub: PubSub = client.pubsub()
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await self.client.aclose()


class Shards:
    """The hub's subscriber on a cluster: `subscribe` and `unsubscribe` as the
    one-server PubSub's; every message (`smessage`, `ssubscribe`) goes to `deliver` as
    the one-server subscriber's would (`message`, `subscribe`)."""

    def __init__(self, cluster: aioredis.RedisCluster, deliver: Deliver, **connection: Any) -> None:
        self.cluster = cluster
        self.deliver = deliver
        self.connection = connection  # credentials, TLS: as the cluster client's
        self.routes: dict[bytes, str] = {}  # a subscribed channel: the shard it is on
        self.orphans: set[bytes] = set()  # subscribed channels waiting for a shard
        self.shards: dict[str, Shard] = {}
        self._lock = asyncio.Lock()
        self._reroute: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads the slot map now if the cluster answers; else at the first subscribe."""
        with contextlib.suppress(redis.RedisError, OSError):
            await self.cluster.initialize()

    async def stop(self) -> None:
        if self._reroute is not None:
            self._reroute.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reroute
        for shard in list(self.shards.values()):
            await shard.close()
        self.shards.clear()

    @property
    def connected(self) -> bool:
        return bool(self.shards) and not self.orphans

    # -- what the hub asks --------------------------------------------------------------

    async def subscribe(self, *names: bytes) -> None:
        async with self._lock:
            for name in names:
                self.routes.pop(name, None)
                self.orphans.add(name)
            await self._route(list(names))

    async def unsubscribe(self, *names: bytes) -> None:
        async with self._lock:
            by_shard: defaultdict[str, list[bytes]] = defaultdict(list)
            for name in names:
                self.orphans.discard(name)
                where = self.routes.pop(name, None)
                if where is not None:
                    by_shard[where].append(name)
            for where, channels in by_shard.items():
                shard = self.shards.get(where)
                if shard is None:
                    continue
                try:
                    for group in by_slot(channels):
                        await shard.pubsub.sunsubscribe(*group)
                except (redis.RedisError, OSError):
                    pass  # the connection is gone: its subscriptions with it

    # -- routing --------------------------------------------------------------------------

    async def _route(self, names: Iterable[bytes]) -> None:
        """Subscribe `names` (all in `orphans`) on their slots' primaries; what cannot be
        subscribed now stays an orphan, and the reroute task tries again. Under _lock."""
        by_node: defaultdict[str, list[bytes]] = defaultdict(list)
        nodes: dict[str, ClusterNode] = {}
        try:
            if not self.cluster.nodes_manager.slots_cache:
                await self.cluster.initialize()
            for name in names:
                node = self.cluster.nodes_manager.get_node_from_slot(key_slot(name))
                nodes[node.name] = node
                by_node[node.name].append(name)
        except (redis.RedisError, OSError, IndexError, KeyError) as exc:
            log.warning("no slot map of the cluster (%s): subscribing later", exc)
            self._later()
            return
        for where, channels in by_node.items():
            try:
                shard = await self._shard(nodes[where])
                for group in by_slot(channels):
                    await shard.pubsub.ssubscribe(*group)
            except (redis.RedisError, OSError) as exc:
                log.warning("shard %s cannot subscribe (%s): trying again", where, exc)
                await self._drop(where)
                continue
            for name in channels:
                self.orphans.discard(name)
                self.routes[name] = where
        if self.orphans:
            self._later()

    async def _shard(self, node: ClusterNode) -> Shard:
        shard = self.shards.get(node.name)
        if shard is None:
            client = aioredis.Redis(
                host=node.host,
                port=int(node.port),
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),  # a shard gone is rerouted, not retried
                **self.connection,
            )
            shard = self.shards[node.name] = Shard(node.name, client)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await shard.pubsub.connect()  # type: ignore[no-untyped-call]
            shard.task = asyncio.create_task(self._read(shard), name=f"shard-{node.name}")
        return shard

    async def _drop(self, where: str) -> None:
        """A shard's connection failed: its channels are orphans until routed again."""
        shard = self.shards.pop(where, None)
        for name, route in list(self.routes.items()):
            if route == where:
                del self.routes[name]
                self.orphans.add(name)
        if shard is not None:
            current = asyncio.current_task()
            if shard.task is current:
                shard.task = None  # it is this one: it ends by returning
            await shard.close()
        self._later()

    def _later(self) -> None:
        if self._reroute is None or self._reroute.done():
            self._reroute = asyncio.create_task(self._rerouting(), name="shards-reroute")

    async def _rerouting(self) -> None:
        """Until no channel waits for a shard: read the slot map again, and route."""
        while self.orphans:
            await asyncio.sleep(REROUTE_SECONDS)
            async with self._lock:
                if not self.orphans:
                    break
                with contextlib.suppress(redis.RedisError, OSError):
                    await self.cluster.nodes_manager.initialize()
                await self._route(sorted(self.orphans))

    # -- reading ------------------------------------------------------------------------

    async def _read(self, shard: Shard) -> None:
        while True:
            raise_if_cancelled()
            try:
                message = await shard.pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("shard %s lost (%s): routing its channels again", shard.name, exc)
                async with self._lock:
                    if self.shards.get(shard.name) is shard:
                        await self._drop(shard.name)
                return
            if message is None:
                continue
            kind = message["type"]
            if kind == "smessage":
                self.deliver({**message, "type": "message"})
            elif kind == "ssubscribe":
                self.deliver({**message, "type": "subscribe"})
            elif kind == "sunsubscribe":
                name = message["channel"]
                if self.routes.get(name) == shard.name:
                    # Not asked for: the slot moved (or its shard failed over).
                    async with self._lock:
                        if self.routes.get(name) == shard.name:
                            del self.routes[name]
                            self.orphans.add(name)
                            self._later()


def by_slot(channels: Iterable[bytes]) -> list[list[bytes]]:
    """Channels grouped by hash slot: one SSUBSCRIBE may not span slots."""
    groups: defaultdict[int, list[bytes]] = defaultdict(list)
    for name in channels:
        groups[key_slot(name)].append(name)
    return list(groups.values())
