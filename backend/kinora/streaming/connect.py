"""Every Redis connection of the live-progress layer is made here: one home for the
topology and the policy.

The topology is what `REDIS_URL` says (README, Deployment):

- `redis://[user:password@]host:port/db`, `rediss://…` (TLS; ACL users by name), or
  `unix:///path/redis.sock`: one server;
- `redis+sentinel://[user:password@]host:26379,host2:26379/<service>[/db]` (or
  `rediss+sentinel://` for TLS to the servers): the primary Sentinel names for
  `<service>`, found again after a failover. `?sentinel_password=` when the Sentinels
  have a password of their own;
- `redis+cluster://[user:password@]host:port[,host:port…]` (or `rediss+cluster://`): a
  Redis Cluster, its nodes found from any of those named. Each job's keys share a hash
  slot (kinora.streaming.keys) and its events go out on sharded pub/sub (SPUBLISH on
  the shard that owns the slot; the hub SSUBSCRIBEs per shard: kinora.streaming.shards).
  Celery's broker is then another Redis (`BROKER_URL`): kombu has no cluster transport.

The policy: every call fails within seconds on a Redis that is gone or paused, and
retries once at once on a fresh connection (the first call after Redis restarted, or
after a failover, finds its pooled socket dead). redis-py's default retries with
backoff, which keeps a caller waiting seconds more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
SENTINEL_PORT = 26379
SERVER_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PORT = 6379
# Connections the API's cluster client may open to each node (commands run at once).
CLUSTER_CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class Topology:
    """Where Redis is: `url` itself (one server), or the Sentinels that know the
    primary of `service`."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None
    nodes: tuple[tuple[str, int], ...] = ()  # a cluster's: where to find the others

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def cluster(self) -> bool:
        return bool(self.nodes)

    def cluster_kwargs(self) -> dict[str, Any]:
        from redis.cluster import ClusterNode

        return {
            "startup_nodes": [
                ClusterNode(host, port)  # type: ignore[no-untyped-call]
                for host, port in self.nodes
            ],
            "username": self.username,
            "password": self.password,
        } | ({"ssl": True} if self.tls else {})

    def server_kwargs(self) -> dict[str, Any]:
        """What a connection to the primary needs besides its address."""
        return {"username": self.username, "password": self.password, "db": self.db} | (
            {"ssl": True} if self.tls else {}
        )


def topology(url: str) -> Topology:
    """Parse a REDIS_URL; a ValueError that says which forms there are."""
    parts = urlsplit(url)
    if parts.scheme in SERVER_SCHEMES:
        return Topology(url)
    if parts.scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ValueError(
            f"REDIS_URL {parts.scheme or url!r}: not a Redis URL Kinora knows. Use redis://, "
            "rediss:// (TLS), unix://, redis+sentinel://host:26379,host2:26379/<service>, "
            "or redis+cluster://host:6379,host2:6379"
        )
    if parts.scheme in CLUSTER_SCHEMES:
        nodes = _hosts(url, parts.netloc, CLUSTER_PORT, "a cluster node")
        if not nodes or parts.path.strip("/") or parts.query:
            raise ValueError(
                f"REDIS_URL {url!r}: a cluster URL names some of its nodes and nothing "
                "else (a cluster has one database): redis+cluster://host:6379,host2:6379"
            )
        return Topology(
            url,
            nodes=tuple(nodes),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme.startswith("rediss"),
        )
    sentinels = _hosts(url, parts.netloc, SENTINEL_PORT, "a Sentinel")
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"REDIS_URL {url!r}: a Sentinel URL names its Sentinels and the primary's "
            "service: redis+sentinel://host:26379,host2:26379/<service>[/<db>]"
        )
    query = parse_qs(parts.query)
    return Topology(
        url,
        sentinels=tuple(sentinels),
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme.startswith("rediss"),
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def _hosts(url: str, netloc: str, default_port: int, what: str) -> list[tuple[str, int]]:
    found = []
    for host in filter(None, netloc.rpartition("@")[2].split(",")):
        if host.startswith("["):  # an IPv6 address: [::1]:26379
            name, _, rest = host[1:].partition("]")
            port = rest[1:]
        else:
            name, _, port = host.partition(":")
        if port and not port.isdigit():
            raise ValueError(f"REDIS_URL {url!r}: {what}'s port is a number, not {port!r}")
        found.append((name, int(port) if port else default_port))
    return found


def quick_retry() -> Retry:
    return Retry(NoBackoff(), 1)


def _sentinel_kwargs(where: Topology) -> dict[str, Any]:
    timeouts = {"socket_timeout": READ_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    return timeouts | ({"password": where.sentinel_password} if where.sentinel_password else {})


def sync_redis(url: str) -> redis.Redis:
    """A client for the worker's side: a job waits at most a few seconds per call on a
    Redis that is gone or paused (its events wait in the outbox meanwhile)."""
    where = topology(url)
    policy: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": READ_TIMEOUT,
        "retry": quick_retry(),
        "health_check_interval": 30,
    }
    if where.cluster:
        cluster: redis.Redis = redis.cluster.RedisCluster(  # type: ignore[assignment]
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=READ_TIMEOUT,
            **where.cluster_kwargs(),
        )
        return cluster
    if where.sentinel:
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(where.sentinels), sentinel_kwargs=_sentinel_kwargs(where), **policy
        )
        client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
            where.service, **where.server_kwargs()
        )
        return client
    # One connection, held (and locked per command: the outbox's thread shares it): no
    # pool to take it from and give it back to on every event.
    return redis.Redis.from_url(url, single_connection_client=True, **policy)


# The longest any one Redis call of the API may take (connect, or read a reply).
ASYNC_TIMEOUT = 2.0
# Waiting this long for a free pooled connection, plus one call's two tries, stays
# under the 10 s in which every request is answered (docs/protocol.md, Faults).
POOL_WAIT_SECONDS = 5.0


class SentinelBlockingPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The primary Sentinel names, on a pool that waits for a free connection (as the
    one-server command pool does) instead of failing."""


def _manager(where: Topology, **policy: Any) -> aiosentinel.Sentinel:
    return aiosentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(where.sentinels), sentinel_kwargs=_sentinel_kwargs(where), **policy
    )


def commands(url: str, connections: int) -> aioredis.Redis:
    """The API's command client (history, presence, publish), each call bounded: an
    unreachable or paused Redis is an error within seconds (a 503), never a hang.
    Waiting for a free connection is queueing, not an outage (two thousand streams
    replaying at once wait their turn): it has a longer bound. from_pool: the client
    owns the pool and closes its connections in aclose()."""
    policy: dict[str, Any] = {
        "socket_timeout": ASYNC_TIMEOUT,
        "socket_connect_timeout": ASYNC_TIMEOUT,
        "retry": quick_retry(),
    }
    where = topology(url)
    if where.cluster:
        cluster: aioredis.Redis = aioredis.RedisCluster(  # type: ignore[assignment]
            socket_timeout=ASYNC_TIMEOUT,
            socket_connect_timeout=ASYNC_TIMEOUT,
            max_connections=max(connections, CLUSTER_CONNECTIONS),
            **where.cluster_kwargs(),
        )
        return cluster
    if where.sentinel:
        client: aioredis.Redis = _manager(where, **policy).master_for(
            where.service,
            connection_pool_class=SentinelBlockingPool,
            max_connections=connections,
            timeout=POOL_WAIT_SECONDS,
            **where.server_kwargs(),
        )
        return client
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url, max_connections=connections, timeout=POOL_WAIT_SECONDS, **policy
        )
    )


async def close(client: aioredis.Redis) -> None:
    """Close a client and, for a Sentinel topology, its connections to the Sentinels
    (the client's own pool does not hold them, and an event loop closed with them open
    does not close cleanly)."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def subscriber(url: str) -> aioredis.Redis:
    """The pub/sub connection, with no read timeout: it waits for events as long as
    none come."""
    policy: dict[str, Any] = {"socket_connect_timeout": ASYNC_TIMEOUT, "socket_keepalive": True}
    where = topology(url)
    if where.sentinel:
        client: aioredis.Redis = _manager(where, **policy).master_for(
            where.service, max_connections=1, **where.server_kwargs()
        )
        return client
    return aioredis.Redis.from_pool(
        aioredis.ConnectionPool.from_url(url, max_connections=1, **policy)
    )


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and transport options for the same Redis: kombu's Sentinel
    transport (`sentinel://…;sentinel://…` with the service as `master_name`)."""
    where = topology(url)
    if where.cluster:
        raise ValueError(
            f"{url!r} is a Redis Cluster, which Celery cannot use as its broker: set "
            "BROKER_URL to a Redis server (or a Sentinel URL) for the queue"
        )
    if not where.sentinel:
        return url, {}
    auth = ""
    if where.password:
        auth = f"{where.username or ''}:{where.password}@"
    broker = ";".join(
        f"sentinel://{auth}{host}:{port}/{where.db}" for host, port in where.sentinels
    )
    options: dict[str, Any] = {"master_name": where.service}
    if where.sentinel_password:
        options["sentinel_kwargs"] = {"password": where.sentinel_password}
    return broker, options
