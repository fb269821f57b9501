"""Settings every process of the test session shares (README, Settings names), and
forgetting what was cached from the old ones."""

from __future__ import annotations

from kinora.core import db
from kinora.core.config import get_settings
from kinora.streaming import logger

FAST = {
    "MOCK_STEP_SECONDS": "0.2",
    "SSE_PING_SECONDS": "0.5",
    "SSE_SEND_TIMEOUT_SECONDS": "5",
    "STREAM_QUEUE_SIZE": "64",
    "SECRET_KEY": "test-secret-key",
    "VIDEO_COST": "100",
    "LEASE_SECONDS": "3",
    "SWEEP_INTERVAL_SECONDS": "1",
    "RETRY_COUNTDOWN_SECONDS": "1",
    # Long enough that a stall of the loaded machine (two end-to-end halves at once on
    # two cores) never times a video out; the timeout itself is tested in-process
    # (tests/worker/test_steps.py), where it takes no waiting.
    "VIDEO_TIMEOUT_SECONDS": "60",
    "WS_PING_SECONDS": "0.5",
    "WS_PONG_TIMEOUT_SECONDS": "1.5",
    "PRESENCE_TTL_SECONDS": "2",
}


def reset_caches() -> None:
    """Forget cached settings, engines and clients after the environment changed."""
    get_settings.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    logger.close_sync_clients()
