"""Webhooks: the rules (README, Webhooks). A video may name a URL and the events it wants
(`started`, `completed`, `failed`, `cancelled`); when one of them happens, a delivery
is queued by name (dispatch) and the worker's webhook queue POSTs it, signed the
Standard Webhooks way, retrying with backoff for 24 h under one `webhook-id`.

Here: which URLs may receive, the user's secret, the signature, the payload, and the
record of every attempt. Queuing never breaks the caller: generation goes on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import random
import secrets
from datetime import datetime
from typing import Any, Literal, get_args

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from kinora.core import egress
from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import User, Video, WebhookAttempt, utcnow
from kinora.core.tokens import sign_scoped
from kinora.jobs import dispatch
from kinora.jobs.lifecycle import VideoParameters, content_path

log = logging.getLogger(__name__)

WebhookEvent = Literal["started", "completed", "failed", "cancelled"]
EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
DEFAULT_EVENTS: list[WebhookEvent] = ["completed", "failed", "cancelled"]


def check_url(url: str, *, allow_private: bool) -> str:
    """The URL as given, or ValueError saying why it cannot receive webhooks: what the
    egress guard decides without DNS (a name is resolved and checked at delivery)."""
    try:
        egress.check(url, allow_private=allow_private)
    except egress.Refused as exc:
        hint = "" if allow_private else " (set WEBHOOK_ALLOW_PRIVATE=true to allow)"
        raise ValueError(f"{exc}{hint}") from None
    return url


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_for(session: Session, user_id: int) -> str:
    """The user's signing secret, made on first use (committed by the caller's scope)."""
    user = session.get(User, user_id)
    assert user is not None
    if user.webhook_secret is None:
        user.webhook_secret = new_secret()
    return user.webhook_secret


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: v1, HMAC-SHA256 over `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_id(video_id: int, event: str) -> str:
    """One id per video and event, kept by every attempt (receivers deduplicate)."""
    return f"msg_video_{video_id}_{event}"


def notify(video_id: int, event: WebhookEvent) -> None:
    """Queue the video's webhook for `event` if it asked for one, its body rendered now,
    when the event happens: every attempt resends these bytes under one `webhook-id`
    (a retry of `started` must not say `failed` because the video failed since). Never
    raises: generation goes on whatever happens to its webhooks."""
    try:
        with session_scope() as session:
            video = session.get(Video, video_id)
            if video is None or not video.webhook_url:
                return
            if event not in (video.webhook_events or DEFAULT_EVENTS):
                return
            body = render(video, event)
        dispatch.deliver_webhook(video_id, event, webhook_id(video_id, event), body.decode())
    except Exception:
        log.exception("webhook %s of video %s not queued", event, video_id)


def render(video: Video, event: str) -> bytes:
    """The body of the video's webhook for `event`: the video as it is now."""
    body = {
        "type": f"video.{event}",
        "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
        "data": video_data(video),
    }
    return orjson.dumps(body)


def retry_delay(attempt: int, base: float) -> float:
    """How long after failed attempt `attempt` (1, 2, …) the next one waits: doubling from
    `base`, each wait drawn from its upper half (jitter, as Celery's `retry_jitter`), so
    the deliveries that failed together while a receiver was down do not all come back
    at the same second."""
    nominal: float = base * 2 ** (attempt - 1)
    return nominal * (0.5 + 0.5 * random.random())


def video_data(video: Video) -> dict[str, Any]:
    """The video as GET /api/v1/videos/{id} returns it (without its recent events),
    its URLs on PUBLIC_URL when that is set."""
    base = (get_settings().public_url or "").rstrip("/")
    params = VideoParameters.of(video.parameters)
    completed = str(video.status) == "completed"

    def url(what: Literal["content", "thumbnail"]) -> str | None:
        return base + content_path(video.id, video.user_id, what) if completed else None

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": video.id,
        "status": str(video.status),
        "progress": video.progress,
        "prompt": video.prompt,
        "seconds": params.seconds,
        "size": params.size,
        "error_message": video.error_message,
        "video_url": url("content"),
        "thumbnail_url": url("thumbnail"),
        "stream_url": f"{base}/api/v1/videos/{video.id}/stream?token="
        + sign_scoped(video.id, video.user_id),
        "created_at": when(video.created_at),
        "updated_at": when(video.updated_at),
        "completed_at": when(video.completed_at),
        "last_event_id": str(video.last_seq) if video.last_seq else None,
        "logs": [],
    }


def record(
    video_id: int,
    event: str,
    hook_id: str,
    attempt: int,
    url: str,
    *,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
) -> None:
    with session_scope() as session:
        session.add(
            WebhookAttempt(
                video_id=video_id, event=event, webhook_id=hook_id, attempt=attempt, url=url,
                status_code=status_code, error=error, duration_ms=duration_ms,
                created_at=utcnow(),
            )
        )  # fmt: skip


def attempts(session: Session, video_id: int) -> list[WebhookAttempt]:
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.video_id == video_id)
            .order_by(WebhookAttempt.id)
        )
    )
