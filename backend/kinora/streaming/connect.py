"""Every Redis connection of the live-progress layer is made here (one home for the
topology and the policy): every call fails within seconds on a Redis that is gone or
paused, and retries once at once on a fresh connection (the first call after Redis
restarted finds its pooled socket dead). redis-py's default retries with backoff,
which keeps a caller waiting seconds more."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0


def quick_retry() -> Retry:
    return Retry(NoBackoff(), 1)


def sync_redis(url: str) -> redis.Redis:
    """A client for the worker's side: a job waits at most a few seconds per call on a
    Redis that is gone or paused (its events wait in the outbox meanwhile)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=READ_TIMEOUT,
        retry=quick_retry(),
        health_check_interval=30,
        # One connection, held (and locked per command: the outbox's thread shares it):
        # no pool to take it from and give it back to on every event.
        single_connection_client=True,
    )


# The longest any one Redis call of the API may take (connect, or read a reply).
ASYNC_TIMEOUT = 2.0
# Waiting this long for a free pooled connection, plus one call's two tries, stays
# under the 10 s in which every request is answered (docs/protocol.md, Faults).
POOL_WAIT_SECONDS = 5.0


def commands(url: str, connections: int) -> aioredis.Redis:
    """The API's command client (history, presence, publish), each call bounded: an
    unreachable or paused Redis is an error within seconds (a 503), never a hang.
    Waiting for a free connection is queueing, not an outage (two thousand streams
    replaying at once wait their turn): it has a longer bound. from_pool: the client
    owns the pool and closes its connections in aclose()."""
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=POOL_WAIT_SECONDS,
            socket_timeout=ASYNC_TIMEOUT,
            socket_connect_timeout=ASYNC_TIMEOUT,
            retry=quick_retry(),
        )
    )


def subscriber(url: str) -> aioredis.Redis:
    """The pub/sub connection, with no read timeout: it waits for events as long as
    none come."""
    return aioredis.Redis.from_pool(
        aioredis.ConnectionPool.from_url(
            url,
            max_connections=1,
            socket_connect_timeout=ASYNC_TIMEOUT,
            socket_keepalive=True,
        )
    )
