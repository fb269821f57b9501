"""All settings of Kinora, from the environment or `.env` (README, Settings).

Nothing else in the package reads `os.environ`; everything asks `get_settings()`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Read by prometheus_client itself when it is imported (kinora.core.metrics); named here so
# that the processes which set it for their children agree on it.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir() -> str | None:
    """The directory of metric files this process shares, if any."""
    return os.environ.get(METRICS_DIR_ENV) or None


def share_metrics_dir(directory: Path) -> None:
    """Share metric files in `directory` with the processes this one starts (they
    inherit the environment; prometheus_client reads it when first imported)."""
    os.environ[METRICS_DIR_ENV] = str(directory)


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a process this one starts: its own, plus `extra`."""
    return {**os.environ, **extra}


class Settings(BaseSettings):
    # env_ignore_empty: `REDIS_URL=` (as compose and .env files write an unset value)
    # means the default, not an empty URL.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    # Where `kinora up` keeps its state (database, embedded Redis, videos, secret).
    var_dir: Path = Field(default=Path("var"), alias="KINORA_VAR_DIR")

    database_url: str | None = None
    redis_url: str | None = None
    # Celery's broker, when it is not REDIS_URL's Redis (a Redis Cluster cannot be one).
    broker_url: str | None = None

    use_mock_sora: bool = True
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_video_model: str = "sora-2"
    # One HTTP request to the video API; a create that takes longer has an unknown
    # outcome and is looked up (not repeated) by the next attempt.
    openai_timeout_seconds: float = 60.0

    mock_step_seconds: float = 2.0

    sse_ping_seconds: float = 15.0
    sse_timeout_seconds: float = 1800.0
    sse_retry_ms: int = 3000
    # A stream whose write has not gone through for this long (its client stopped
    # reading) is disconnected (kinora.streaming.sse).
    sse_send_timeout_seconds: float = 30.0
    ws_ping_seconds: float = 30.0
    ws_pong_timeout_seconds: float = 60.0
    # On SIGTERM, an API process answers /readyz with 503 and ends its streams with a
    # last `retry:` spread over this many seconds, then stops (README, Deployment).
    drain_seconds: float = Field(default=10.0, ge=0)
    # A live stream of a video with no event for this long looks at the database again:
    # a video whose last events never reached Redis (its worker died with them) still
    # ends (kinora.streaming.hub).
    recheck_idle_seconds: float = Field(default=10.0, gt=0)

    video_timeout_seconds: int = 1200
    # A worker's claim on a video lasts this long and is renewed (every third of it)
    # while it works; a claim left to expire (the worker died) is taken over: a killed
    # worker's video resumes within LEASE_SECONDS + SWEEP_INTERVAL_SECONDS (README, Faults:
    # within 30 s at the defaults).
    lease_seconds: float = 20.0
    # How often each worker's sweeper looks for expired claims and lost messages.
    sweep_interval_seconds: float = 5.0
    # A video still pending this long is queued again (its message may be lost); a
    # duplicate message is harmless, the claim lets only one through.
    stale_pending_seconds: float = 300.0
    max_retries: int = 3
    retry_countdown_seconds: int = 60
    video_cost: int = 100
    event_retention_seconds: int = 86400
    # The history of one video is capped; a video publishes a few dozen events.
    event_history_max: int = 10_000
    storage_dir: Path | None = None

    # A watcher this many events behind its video's live events is cut off; it resumes
    # with Last-Event-ID. A video's live log keeps at most twice this many events.
    stream_queue_size: int = 256
    # Lifetime of the scoped tokens carried by stream_url / video_url.
    scoped_token_ttl_seconds: int = 3600
    # An API process that stops renewing its presence for this long (it crashed) no
    # longer counts in /connections.
    presence_ttl_seconds: float = 15.0
    # HMAC key for scoped tokens. Unset: one is generated under var_dir and kept.
    secret_key: str | None = None

    demo_credits: int = 100_000

    # -- production (README "Deployment") -------------------------------------------
    # `json`: one JSON object a line, with trace_id and video_id, for a log collector.
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # Origins (comma-separated) whose pages may call the API from a browser; none by
    # default (the built-in page is served from the API's own origin).
    cors_origins: Annotated[list[str], NoDecode] = []
    # Largest request body accepted (a 10 MB reference image as a data: URL fits).
    max_request_bytes: int = 16 * 1024 * 1024
    # Videos one user may submit per window; over it, 429 with Retry-After. 0: no limit.
    generate_rate_limit: int = 30
    generate_rate_window_seconds: int = 60
    # Streams (SSE and WebSocket) one user may hold open at once per API process; one
    # more is a 429 (a WebSocket is closed with 1013). 0: no limit.
    max_streams_per_user: int = 100
    # A stream replays history this many events at a time, each page written before the
    # next is read: what bounds a replaying connection's memory (bench.replay).
    history_page_size: int = Field(default=200, ge=1)
    # Webhooks (README, Webhooks): the first retry's wait (then doubling, for 24 h), how
    # long a receiver has to answer, and whether private addresses may receive them.
    webhook_retry_seconds: float = Field(default=10.0, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_give_up_seconds: float = 86400.0
    webhook_allow_private: bool = False
    # A reference image's URL may lead to a loopback, private or link-local address
    # (README, Egress: off, so the worker is nobody's way inside).
    reference_allow_private: bool = False
    # The server's public address, for the URLs inside a webhook's video (the worker
    # sends it, and does not know the host a client used). Unset: the paths alone.
    public_url: str | None = None
    # Proxies (comma-separated addresses, or *) whose X-Forwarded-Proto/-For the API
    # trusts, so that the stream and content URLs it returns use the public scheme.
    forwarded_allow_ips: str = "127.0.0.1"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'kinora.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.var_dir / "videos").resolve()

    @property
    def required_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "REDIS_URL is not set: run `kinora up` (which embeds Redis) or set REDIS_URL"
            )
        return self.redis_url

    @property
    def use_mock(self) -> bool:
        return self.use_mock_sora or not self.openai_api_key

    def resolved_secret_key(self) -> bytes:
        """The HMAC key for scoped tokens, created once under var_dir when not configured."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.var_dir / "secret.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole under a private name, then linked into place: two processes
            # starting at once agree on one key, and neither reads a half-written file.
            tmp = path.with_name(f".secret.key.{os.getpid()}")
            tmp.write_text(secrets.token_urlsafe(48))
            tmp.chmod(0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> Settings:
    return Settings()
