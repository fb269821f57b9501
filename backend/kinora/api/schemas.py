"""The JSON the videos API takes and gives (README, Try it with curl)."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kinora.core import egress
from kinora.core.config import get_settings
from kinora.core.models import VideoStatus
from kinora.jobs import reference, webhooks
from kinora.jobs.lifecycle import DEFAULT_SECONDS, DEFAULT_SIZE, Seconds, Size, VideoParameters
from kinora.jobs.webhooks import WebhookEvent

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=10, max_length=2000, description="What the video shows")
    image_url: str | None = Field(
        default=None,
        description="http(s) URL (at most 2,048 characters) or data: URL (at most 10 MB "
        "of image) of a PNG/JPEG reference image",
    )
    seconds: Seconds = DEFAULT_SECONDS
    size: Size = DEFAULT_SIZE
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="http(s) URL to POST the video's events to"
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        description="which events to POST (default: completed, failed, cancelled)",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        return webhooks.check_url(value, allow_private=get_settings().webhook_allow_private)

    @field_validator("prompt")
    @classmethod
    def _printable(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        if visible_length(value) < 10:
            raise ValueError(
                "needs at least 10 visible characters (spaces and invisible ones do not count)"
            )
        return value

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value.startswith("data:"):
            if not re.match(r"data:image/(png|jpeg);base64,", value):
                raise ValueError("a data: URL must be data:image/png or data:image/jpeg, base64")
            # Checked here, before anything is charged; an http(s) image is fetched
            # (with the same limits) by the worker, which refunds if it is unusable.
            try:
                reference.check(reference.load(value))
            except reference.BadReference as exc:
                raise ValueError(str(exc)) from None
        else:
            # What the egress guard decides without DNS: a malformed URL, localhost or
            # a private address in any spelling is a 422 here, not a refund later.
            try:
                egress.check(value, allow_private=get_settings().reference_allow_private)
            except egress.Refused as exc:
                raise ValueError(f"{exc} (an http(s):// or data:image/... URL)") from None
        return value

    @property
    def webhook(self) -> tuple[str, list[str]] | None:
        if not self.webhook_url:
            return None
        events = self.webhook_events or webhooks.DEFAULT_EVENTS
        return self.webhook_url, sorted(set(events), key=webhooks.EVENTS.index)

    @property
    def parameters(self) -> VideoParameters:
        return VideoParameters(seconds=self.seconds, size=self.size, image_url=self.image_url)


# Unicode categories that draw nothing: controls, format characters (zero-width
# spaces and joiners, bidi marks) and separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible_length(text: str) -> int:
    return sum(1 for ch in text if unicodedata.category(ch) not in _INVISIBLE)


class GenerateResponse(BaseModel):
    video_id: int
    status: VideoStatus
    task_id: str
    stream_url: str
    credits_remaining: int


class VideoOut(BaseModel):
    id: int
    status: VideoStatus
    progress: int
    prompt: str
    seconds: int
    size: str
    error_message: str | None
    video_url: str | None
    thumbnail_url: str | None
    stream_url: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    last_event_id: str | None
    logs: list[dict[str, Any]]


class VideoSummary(BaseModel):
    id: int
    status: VideoStatus
    progress: int
    prompt: str
    created_at: datetime
    completed_at: datetime | None


class VideoList(BaseModel):
    videos: list[VideoSummary]
    total: int
    limit: int
    offset: int


class Connections(BaseModel):
    video_id: int
    connections: int


class WebhookSecret(BaseModel):
    secret: str


class WebhookAttemptOut(BaseModel):
    webhook_id: str
    event: str
    attempt: int
    url: str
    status_code: int | None
    error: str | None
    duration_ms: int
    created_at: datetime


class WebhookAttempts(BaseModel):
    video_id: int
    attempts: list[WebhookAttemptOut]
