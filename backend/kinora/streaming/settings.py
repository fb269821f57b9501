"""What the live-progress layer is told, by its host (docs/library.md).

The layer reads no host's settings of its own accord: Kinora builds a StreamSettings
from its own (kinora.api.app), and a library host passes one, or takes `from_env()`,
which reads the same names from the environment (`REDIS_URL`, `SSE_PING_SECONDS`, …).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

HISTORY_MAX = 10_000
RETENTION_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a job's events Redis keeps: at most `history_max` events, for
    `seconds` after the job's last one."""

    history_max: int = HISTORY_MAX
    seconds: int = RETENTION_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Retention:
        env = os.environ if environ is None else environ
        return cls(
            history_max=_number(env, "EVENT_HISTORY_MAX", HISTORY_MAX, int),
            seconds=_number(env, "EVENT_RETENTION_SECONDS", RETENTION_SECONDS, int),
        )


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """A progress core's settings (docs/library.md, Settings). Each field is read from the
    environment variable of its name in capitals by `from_env`."""

    redis_url: str
    sse_ping_seconds: float = 15.0
    sse_timeout_seconds: float = 1800.0
    sse_retry_ms: int = 3000
    sse_send_timeout_seconds: float = 30.0
    ws_ping_seconds: float = 30.0
    ws_pong_timeout_seconds: float = 60.0
    stream_queue_size: int = 256
    presence_ttl_seconds: float = 15.0
    history_page_size: int = 200
    # On SIGTERM, streams end over this many seconds before the server stops (0: at once).
    drain_seconds: float = 10.0
    # A live stream of a job with no event for this long looks at the store again: a
    # job whose last events never reached Redis (its worker died with them) still ends.
    recheck_idle_seconds: float = 10.0
    retention: Retention = Retention()

    @classmethod
    def from_env(
        cls, redis_url: str | None = None, environ: Mapping[str, str] | None = None
    ) -> StreamSettings:
        env = os.environ if environ is None else environ
        url = redis_url or env.get("REDIS_URL")
        if not url:
            raise RuntimeError("no Redis for the progress layer: pass redis_url= or set REDIS_URL")
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name in ("redis_url", "retention"):
                continue
            kind = int if isinstance(field.default, int) else float
            least = 0 if field.name == "drain_seconds" else 1e-9
            values[field.name] = _number(env, field.name.upper(), field.default, kind, least)
        return cls(redis_url=url, retention=Retention.from_env(env), **values)


def _number(
    env: Mapping[str, str], name: str, default: Any, kind: type, least: float = 1e-9
) -> Any:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number: set it to one, or unset it") from None
    if value < least:
        raise ValueError(f"{name}={text!r} must be above 0" if least else f"{name} < 0")
    return value
