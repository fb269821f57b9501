"""Redis connections with bounds (one home for the policy): every call fails within
seconds on a Redis that is gone or paused, and retries once at once on a fresh
connection (the first call after Redis restarted finds its pooled socket dead).
redis-py's default retries with backoff, which keeps a caller waiting seconds more."""

from __future__ import annotations

import redis
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
