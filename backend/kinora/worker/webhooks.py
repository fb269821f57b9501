"""Delivering a video's webhook (README, Webhooks), in the webhook worker (`kinora worker
--webhooks`): POST the signed payload through the egress guard (private addresses
refused unless allowed), record the attempt, and on a non-2xx answer or a timeout try again,
the wait doubling from WEBHOOK_RETRY_SECONDS, until 24 h have passed."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task

from kinora.core import egress
from kinora.core.config import get_settings
from kinora.core.db import session_scope
from kinora.core.models import Video
from kinora.jobs import dispatch, webhooks

log = logging.getLogger(__name__)


class Undeliverable(Exception):
    """Final: the video is gone, or has no webhook."""


def destination(video_id: int) -> tuple[str, str]:
    """The URL and the user's signing secret of a video's webhook."""
    with session_scope() as session:
        video = session.get(Video, video_id)
        if video is None or not video.webhook_url:
            raise Undeliverable(f"video {video_id} has no webhook")
        return video.webhook_url, webhooks.secret_for(session, video.user_id)


def rendered(video_id: int, event: str) -> bytes:
    """The body of a delivery queued before bodies were rendered when the event happened
    (a message from an older release): the video as it is now."""
    with session_scope() as session:
        video = session.get(Video, video_id)
        if video is None:
            raise Undeliverable(f"video {video_id} is gone")
        return webhooks.render(video, event)


def attempt_once(url: str, secret: str, hook_id: str, body: bytes) -> egress.Answer:
    """One POST through the egress guard (private addresses refused unless
    WEBHOOK_ALLOW_PRIVATE, the address checked is the one connected to); a redirect is
    an answer like any other non-2xx."""
    settings = get_settings()
    stamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "Kinora-Webhooks",
        "webhook-id": hook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": webhooks.sign(secret, hook_id, stamp, body),
    }
    return egress.fetch(
        "POST", url, allow_private=settings.webhook_allow_private, headers=headers,
        content=body, timeout=settings.webhook_timeout_seconds, max_bytes=64 * 1024,
    )  # fmt: skip


@shared_task(name=dispatch.DELIVER_WEBHOOK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def deliver_webhook(
    self: Any, video_id: int, event: str, hook_id: str, body: str | None = None
) -> dict[str, Any]:
    settings = get_settings()
    attempt = self.request.retries + 1
    url: str | None = None  # known once the video is read
    started = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    try:
        url, secret = destination(video_id)
        content = body.encode() if body is not None else rendered(video_id, event)
        response = attempt_once(url, secret, hook_id, content)
        status_code = response.status_code
        if 200 <= status_code < 300:
            return {"status": "delivered", "attempt": attempt, "status_code": status_code}
        error = f"HTTP {status_code}"
    except egress.Refused as exc:
        error = f"refused: {exc}" + (
            "" if settings.webhook_allow_private else " (set WEBHOOK_ALLOW_PRIVATE=true to allow)"
        )
        return {"status": "refused", "error": error}
    except Undeliverable as exc:
        error = str(exc)
        return {"status": "refused", "error": error}
    except egress.Unreachable as exc:  # retried: the receiver (or its DNS) may come back
        error = f"unreachable: {exc}"
    finally:
        if url is not None:
            webhooks.record(
                video_id, event, hook_id, attempt, url, status_code=status_code,
                error=error, duration_ms=round(1000 * (time.perf_counter() - started)),
            )  # fmt: skip
    nominal = settings.webhook_retry_seconds * 2 ** (attempt - 1)
    elapsed = sum(settings.webhook_retry_seconds * 2**i for i in range(attempt - 1))
    if elapsed + nominal > settings.webhook_give_up_seconds:
        log.warning("webhook %s of video %s given up after %d attempts", event, video_id, attempt)
        return {"status": "given_up", "attempt": attempt, "error": error}
    wait = webhooks.retry_delay(attempt, settings.webhook_retry_seconds)
    log.info("webhook %s of video %s: %s; again in %.3g s", event, video_id, error, wait)
    raise self.retry(countdown=wait)
