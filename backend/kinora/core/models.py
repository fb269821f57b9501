"""The database's truth: users and their credits, videos and their jobs, the credit ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from kinora.core.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(cls: type[StrEnum]) -> Enum:
    """A StrEnum column stored as its plain value (a VARCHAR, no database enum type),
    read back as the enum member."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use kinora.core.models.utcnow()")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Plan(StrEnum):
    FREE = "free"
    PRO = "pro"


class VideoStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({VideoStatus.COMPLETED, VideoStatus.FAILED, VideoStatus.CANCELLED})


class CreditKind(StrEnum):
    GRANT = "grant"
    CHARGE = "charge"
    REFUND = "refund"


def revoked_before_ms(tokens_valid_after: datetime | None) -> int:
    """A user's `tokens_valid_after` as the instant (ms since the epoch) before which
    their scoped tokens and streams are revoked; 0 if they never rotated."""
    return 0 if tokens_valid_after is None else int(tokens_valid_after.timestamp() * 1000)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    # SHA-256 of the API token: tokens are 256-bit random, so a fast hash is enough
    # and lets the lookup be an index hit.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    credits: Mapped[int] = mapped_column(Integer, default=0)
    plan: Mapped[Plan] = mapped_column(_enum(Plan), default=Plan.FREE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Signs the user's webhooks (Standard Webhooks, `whsec_…`); made when first asked.
    webhook_secret: Mapped[str | None] = mapped_column(String(64), default=None)
    # When the API token was last rotated: every scoped URL signed before it, and every
    # stream opened before it, is revoked (README, Faults, "Tokens end").
    tokens_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    @property
    def revoked_before_ms(self) -> int:
        """Scoped tokens issued before this instant (ms since the epoch) are revoked."""
        return revoked_before_ms(self.tokens_valid_after)

    videos: Mapped[list[Video]] = relationship(back_populates="user")


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (
        Index("ix_videos_user_created", "user_id", "created_at"),
        Index("ix_videos_status_lease", "status", "lease_expires_at"),
        # A model job belongs to exactly one video (README, Faults, tenancy).
        Index("uq_videos_model_job_id", "model_job_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[VideoStatus] = mapped_column(_enum(VideoStatus), default=VideoStatus.PENDING)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text)
    # seconds, size, image_url: what the model is asked for.
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cost: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str] = mapped_column(String(64))
    model_job_id: Mapped[str | None] = mapped_column(String(128), default=None)
    # Set just before the model's create call: if the worker dies before the job id is
    # stored, the next attempt looks for a job created since then instead of paying
    # for a second one.
    model_submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The claim: which worker holds the job, and until when (renewed while it works).
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The seq of the last event known published for the video (a floor: Redis may lose
    # its counter, and a new event must never reuse a seq a client has seen), and the
    # seq of its `complete` event once that is published (README, Faults).
    last_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    end_seq: Mapped[int | None] = mapped_column(Integer, default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    file_path: Mapped[str | None] = mapped_column(String(1024), default=None)
    thumbnail_path: Mapped[str | None] = mapped_column(String(1024), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Where to POST the video's webhooks, and for which of its events (README, Webhooks).
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, default=None)

    user: Mapped[User] = relationship(back_populates="videos")


class CreditEntry(Base):
    """One change of a user's credits. The rows of a user sum to their balance."""

    __tablename__ = "credit_entries"
    # A video is charged once and refunded at most once, whatever races.
    __table_args__ = (UniqueConstraint("video_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    video_id: Mapped[int | None] = mapped_column(ForeignKey("videos.id"), default=None)
    kind: Mapped[CreditKind] = mapped_column(_enum(CreditKind))
    amount: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyKey(Base):
    """A submit's `Idempotency-Key`: the same key and body return the same video."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    key: Mapped[str] = mapped_column(String(255))
    # sha256 of the canonical request body: same key with another body is a 422.
    request_hash: Mapped[str] = mapped_column(String(64))
    video_id: Mapped[int | None] = mapped_column(ForeignKey("videos.id"), default=None)
    credits_remaining: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookAttempt(Base):
    """One attempt at delivering a video's webhook: the same `webhook_id` for all the
    attempts of one event (receivers deduplicate on it)."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_video", "video_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"))
    event: Mapped[str] = mapped_column(String(16))
    webhook_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2048))
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
