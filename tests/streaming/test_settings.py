"""The progress core's settings come from its host: read from the environment with the
names Kinora uses (a library host), or made from Kinora's own Settings (`.env`
included), field by field."""

from __future__ import annotations

import dataclasses

import pytest

from kinora.api.app import stream_settings
from kinora.core.config import Settings
from kinora.streaming import StreamSettings
from kinora.streaming.settings import Retention


def test_a_library_host_reads_the_same_names_from_the_environment() -> None:
    env = {
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "SSE_PING_SECONDS": "2.5",
        "SSE_RETRY_MS": "700",
        "EVENT_HISTORY_MAX": "50",
    }
    found = StreamSettings.from_env(environ=env)
    assert (found.redis_url, found.sse_ping_seconds, found.sse_retry_ms) == (
        "redis://127.0.0.1:1/0", 2.5, 700,
    )  # fmt: skip
    assert found.retention == Retention(history_max=50, seconds=86_400)
    assert found.sse_timeout_seconds == 1800.0  # unset: the default
    # The router's own redis_url wins over the environment's.
    assert StreamSettings.from_env("redis://elsewhere/0", environ=env).redis_url == (
        "redis://elsewhere/0"
    )


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "pass redis_url= or set REDIS_URL"),
        ({"REDIS_URL": "redis://x/0", "SSE_PING_SECONDS": "soon"}, "SSE_PING_SECONDS='soon'"),
        ({"REDIS_URL": "redis://x/0", "STREAM_QUEUE_SIZE": "0"}, "must be above 0"),
    ],
)
def test_a_setting_that_cannot_work_says_which_and_why(env: dict[str, str], said: str) -> None:
    with pytest.raises((RuntimeError, ValueError), match=said):
        StreamSettings.from_env(environ=env)


def test_kinora_passes_each_of_its_settings_of_the_same_name() -> None:
    kinora = Settings(
        redis_url="redis://127.0.0.1:2/0", sse_ping_seconds=3.0, ws_pong_timeout_seconds=9.0,
        stream_queue_size=32, history_page_size=7, event_history_max=99,
    )  # fmt: skip
    found = stream_settings(kinora)
    for field in dataclasses.fields(StreamSettings):
        if field.name not in ("redis_url", "retention"):
            assert getattr(found, field.name) == getattr(kinora, field.name), field.name
    assert found.redis_url == "redis://127.0.0.1:2/0"
    assert found.retention == Retention(99, kinora.event_retention_seconds)
    assert (found.sse_ping_seconds, found.stream_queue_size) == (3.0, 32)
