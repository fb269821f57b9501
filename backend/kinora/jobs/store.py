"""The database rules of a job: charge, claim, lease, progress, finish, refund.

Every rule is one conditional statement, so it holds whatever races it: two
workers, a retry and a redelivery, a cancel and a completion.

Who commits: each function here is one transaction and commits it before it returns
(so a rule's outcome is durable the moment its caller learns it); the caller's
`session_scope` then has nothing left to commit. Nothing else writes these rows.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Result, case, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kinora.core.models import (
    CreditEntry,
    CreditKind,
    User,
    Video,
    VideoStatus,
    utcnow,
)
from kinora.jobs import idempotency


def _changed_one(result: Result[Any]) -> bool:
    """Whether the UPDATE/INSERT touched exactly one row: the conditional statements
    below say yes to exactly one caller."""
    return cast("CursorResult[Any]", result).rowcount == 1


def _update_one(session: Session, *conditions: Any, **values: Any) -> bool:
    """One conditional UPDATE of a video, committed: True for the one caller whose
    conditions held, False for everyone else."""
    result = session.execute(update(Video).where(*conditions).values(**values))
    session.commit()
    return _changed_one(result)


class InsufficientCredits(Exception):
    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"this video costs {needed} credits and you have {available}")
        self.needed = needed
        self.available = available


def grant(session: Session, user: User, amount: int, reason: str = "grant") -> None:
    """Add credits to a user, with its ledger row, in the caller's transaction."""
    session.execute(update(User).where(User.id == user.id).values(credits=User.credits + amount))
    session.add(CreditEntry(user_id=user.id, kind=CreditKind.GRANT, amount=amount, reason=reason))


def create_video(
    session: Session,
    user: User,
    *,
    prompt: str,
    parameters: dict[str, Any],
    cost: int,
    task_id: str,
    idempotency_key: str | None = None,
    request_hash: str = "",
    webhook: tuple[str, list[str]] | None = None,
) -> tuple[Video, int]:
    """Charge the user and create the video in one transaction (committed here).

    Returns the video and the credits left. The charge is a conditional update, so
    two requests at once can never take the balance below zero. With an
    `idempotency_key`, the key is reserved first in the same transaction
    (idempotency.KeyTaken if another request has it).
    """
    key_row = None
    if idempotency_key is not None:
        key_row = idempotency.reserve(session, user.id, idempotency_key, request_hash)
    charged = session.execute(
        update(User)
        .where(User.id == user.id, User.credits >= cost)
        .values(credits=User.credits - cost)
        .returning(User.credits)
    ).scalar_one_or_none()
    if charged is None:
        session.rollback()
        available = session.scalar(select(User.credits).where(User.id == user.id)) or 0
        raise InsufficientCredits(cost, available)
    video = Video(
        user_id=user.id,
        prompt=prompt,
        parameters=parameters,
        cost=cost,
        task_id=task_id,
        status=VideoStatus.PENDING,
        webhook_url=webhook[0] if webhook else None,
        webhook_events=webhook[1] if webhook else None,
    )
    session.add(video)
    session.flush()
    session.add(
        CreditEntry(
            user_id=user.id,
            video_id=video.id,
            kind=CreditKind.CHARGE,
            amount=-cost,
            reason="video generation",
        )
    )
    if key_row is not None:
        key_row.video_id = video.id
        key_row.credits_remaining = charged
    session.commit()
    return video, charged


def claim(session: Session, video_id: int, owner: str, lease_seconds: float) -> bool:
    """pending → processing for exactly one caller; everyone else gets False. A video
    whose claim has expired (its worker died) can be claimed again."""
    now = utcnow()
    return _update_one(
        session,
        Video.id == video_id,
        (Video.status == VideoStatus.PENDING)
        | ((Video.status == VideoStatus.PROCESSING) & (Video.lease_expires_at < now)),
        status=VideoStatus.PROCESSING,
        claimed_by=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempts=Video.attempts + 1,
        updated_at=now,
    )


def hold(session: Session, video_id: int, holder: str, lease_seconds: float) -> bool:
    """A worker has received the video's message and not yet started it (the message
    waits for a free pool process, or for its countdown): it holds the pending video
    under a lease its main process renews (`renew_holds`). If that process dies, the
    message dies with it (the broker gives it back only after its visibility timeout);
    the sweep queues the video again once the hold runs out. False: not pending, or
    held by a live other worker (a duplicate message)."""
    now = utcnow()
    return _update_one(
        session,
        Video.id == video_id,
        Video.status == VideoStatus.PENDING,
        Video.claimed_by.is_(None) | (Video.lease_expires_at < now),
        claimed_by=holder,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
    )


def renew_holds(
    session: Session, holder: str, lease_seconds: float, video_ids: Collection[int]
) -> int:
    """Extend the holds of `holder` on those of `video_ids` still pending (the claim
    replaces a hold); how many it renewed. A hold whose message the worker no longer
    has is not renewed: it runs out, and the sweep queues the video again."""
    if not video_ids:
        return 0
    result = session.execute(
        update(Video)
        .where(
            Video.status == VideoStatus.PENDING,
            Video.claimed_by == holder,
            Video.id.in_(list(video_ids)),
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    session.commit()
    return cast("CursorResult[Any]", result).rowcount


def drop_holds(session: Session, holder: str) -> int:
    """A worker that stops gives its held messages back to the broker, and its holds
    with them."""
    result = session.execute(
        update(Video)
        .where(Video.status == VideoStatus.PENDING, Video.claimed_by == holder)
        .values(claimed_by=None, lease_expires_at=None)
    )
    session.commit()
    return cast("CursorResult[Any]", result).rowcount


def lease_left(session: Session, video_id: int, owner_suffix: str) -> float | None:
    """Seconds until the live claim of an owner ending in `owner_suffix` runs out; None
    if the video is not processing under such a claim."""
    video = session.get(Video, video_id, populate_existing=True)
    if (
        video is None
        or video.status != VideoStatus.PROCESSING
        or not (video.claimed_by or "").endswith(owner_suffix)
        or video.lease_expires_at is None
    ):
        return None
    left = (video.lease_expires_at - utcnow()).total_seconds()
    return left if left > 0 else None


def _owned(video_id: int, owner: str) -> Any:
    return (
        Video.id == video_id,
        Video.status == VideoStatus.PROCESSING,
        Video.claimed_by == owner,
    )


def record_progress(
    session: Session,
    video_id: int,
    owner: str,
    progress: int,
    lease_seconds: float,
    seq: int = 0,
) -> bool:
    """Store progress (never backwards) and the seq of the last event published, and
    renew the lease. False: the job is no longer ours (cancelled, or taken over), so
    the caller should stop."""
    now = utcnow()
    return _update_one(
        session,
        *_owned(video_id, owner),
        progress=case((Video.progress < progress, progress), else_=Video.progress),
        last_seq=case((Video.last_seq < seq, seq), else_=Video.last_seq),
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        updated_at=now,
    )


def record_seq(session: Session, video_id: int, seq: int, *, end: bool = False) -> None:
    """Raise the video's seq floor to `seq`; with `end`, `seq` is its `complete` event's
    (kept once: the first complete published is the only one)."""
    values: dict[str, Any] = {"last_seq": case((Video.last_seq < seq, seq), else_=Video.last_seq)}
    if end:
        values["end_seq"] = case((Video.end_seq.is_(None), seq), else_=Video.end_seq)
    _update_one(session, Video.id == video_id, **values)


def renew(session: Session, video_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the claim; False if the video is no longer this owner's."""
    return _update_one(
        session,
        *_owned(video_id, owner),
        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
    )


def release(session: Session, video_id: int, owner: str) -> bool:
    """processing → pending, for a retry: the model job id stays, so the next attempt
    resumes that job."""
    return _update_one(
        session,
        *_owned(video_id, owner),
        status=VideoStatus.PENDING,
        claimed_by=None,
        lease_expires_at=None,
        updated_at=utcnow(),
    )


def mark_submitting(session: Session, video_id: int, owner: str) -> bool:
    """Note the time just before the model's create call (see Video.model_submitted_at)."""
    return _update_one(
        session,
        *_owned(video_id, owner),
        Video.model_job_id.is_(None),
        model_submitted_at=utcnow(),
    )


class ModelJobTaken(Exception):
    """The model job is another video's already (the unique index says so)."""


def set_model_job(session: Session, video_id: int, owner: str, job_id: str) -> bool:
    """Record the video's model job; ModelJobTaken if another video has it."""
    try:
        return _update_one(
            session, *_owned(video_id, owner), model_job_id=job_id, updated_at=utcnow()
        )
    except IntegrityError:
        session.rollback()
        raise ModelJobTaken(job_id) from None


def adoptable(session: Session, video_id: int, prompt: str, found: list[str]) -> str | None:
    """Which of the model jobs `found` for a video's unanswered create (same prompt and
    parameters, created since) is surely its own: the one no other video has recorded,
    when exactly one is left and no other live video of the same prompt has a create
    whose answer it never got either. Under one shared API key a job can be another
    user's; in doubt, None: a new job is made rather than someone else's adopted."""
    if not found:
        return None
    recorded = set(session.scalars(select(Video.model_job_id).where(Video.model_job_id.in_(found))))
    free = [job for job in found if job not in recorded]
    rival = session.scalar(
        select(func.count())
        .select_from(Video)
        .where(
            Video.id != video_id,
            Video.prompt == prompt,
            Video.status.in_([VideoStatus.PENDING, VideoStatus.PROCESSING]),
            Video.model_submitted_at.is_not(None),
            Video.model_job_id.is_(None),
        )
    )
    session.rollback()
    return free[0] if len(free) == 1 and not rival else None


def complete(
    session: Session, video_id: int, owner: str, *, file_path: str, thumbnail_path: str | None
) -> bool:
    now = utcnow()
    return _update_one(
        session,
        *_owned(video_id, owner),
        status=VideoStatus.COMPLETED,
        progress=100,
        file_path=file_path,
        thumbnail_path=thumbnail_path,
        completed_at=now,
        updated_at=now,
        lease_expires_at=None,
    )


def cancel(session: Session, video_id: int) -> bool:
    """pending/processing → cancelled and refunded, in one transaction. False if the
    video had already ended (completed, failed or cancelled before)."""
    return _end(session, video_id, VideoStatus.CANCELLED, "cancelled by its owner")


def fail(session: Session, video_id: int, message: str, *, owner: str | None = None) -> bool:
    """Mark a live video failed and refund it, in one transaction. False if the video
    had already ended (or, with `owner`, is no longer that worker's)."""
    return _end(session, video_id, VideoStatus.FAILED, message, owner=owner)


def _end(
    session: Session,
    video_id: int,
    status: VideoStatus,
    message: str,
    *,
    owner: str | None = None,
) -> bool:
    now = utcnow()
    conditions: list[Any] = [
        Video.id == video_id,
        Video.status.in_([VideoStatus.PENDING, VideoStatus.PROCESSING]),
    ]
    if owner is not None:
        conditions.append(Video.claimed_by == owner)
    result = session.execute(
        update(Video)
        .where(*conditions)
        .values(
            status=status,
            error_message=message[:2000],
            completed_at=now,
            updated_at=now,
            lease_expires_at=None,
        )
    )
    if not _changed_one(result):
        session.rollback()
        return False
    _refund_in_transaction(session, video_id)
    session.commit()
    return True


def _refund_in_transaction(session: Session, video_id: int) -> bool:
    video = session.get(Video, video_id, populate_existing=True)
    if video is None:
        return False
    # One statement that inserts the refund row unless the unique (video_id, kind)
    # says this video was refunded already: at most one refund, whatever races.
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    inserted = session.execute(
        dialect_insert(CreditEntry)
        .values(
            user_id=video.user_id,
            video_id=video_id,
            kind=CreditKind.REFUND,
            amount=video.cost,
            reason=f"video {video.status}",
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["video_id", "kind"])
        # RETURNING, not rowcount: with RETURNING (which SQLAlchemy adds on
        # PostgreSQL) the driver's rowcount does not say whether a row went in.
        .returning(CreditEntry.id)
    ).scalar_one_or_none()
    if inserted is None:
        return False
    session.execute(
        update(User).where(User.id == video.user_id).values(credits=User.credits + video.cost)
    )
    return True


@dataclass(frozen=True)
class Sweep:
    timed_out: list[int]  # failed and refunded: past VIDEO_TIMEOUT_SECONDS
    # pending again (an expired claim or hold) or pending too long: queue again
    requeue: list[int]


def sweep(session: Session, *, video_timeout: float, stale_pending: float) -> Sweep:
    """What a periodic sweep finds: videos past their deadline, claims and holds whose
    worker died, and pending videos whose message may be lost. Each change is
    conditional, so any number of sweepers can run at once."""
    now = utcnow()
    live = [VideoStatus.PENDING, VideoStatus.PROCESSING]
    # A video whose model job exists is left to the worker that takes it over: that one
    # looks at the model's job first, and delivers a finished one whatever the deadline
    # (a paid result is not refunded); an unfinished one it fails at the deadline.
    overdue = session.scalars(
        select(Video.id).where(
            Video.status.in_(live),
            Video.created_at < now - timedelta(seconds=video_timeout),
            Video.model_job_id.is_(None),
        )
    ).all()
    session.rollback()
    timed_out = [
        video_id
        for video_id in overdue
        if fail(session, video_id, f"generation took longer than {video_timeout:g} s")
    ]
    expired = session.scalars(
        update(Video)
        .where(Video.status == VideoStatus.PROCESSING, Video.lease_expires_at < now)
        .values(status=VideoStatus.PENDING, claimed_by=None, lease_expires_at=None, updated_at=now)
        .returning(Video.id)
    ).all()
    # Held by a worker that died before it started the video (see `hold`).
    orphaned = session.scalars(
        update(Video)
        .where(
            Video.status == VideoStatus.PENDING,
            Video.claimed_by.is_not(None),
            Video.lease_expires_at < now,
        )
        .values(claimed_by=None, lease_expires_at=None, updated_at=now)
        .returning(Video.id)
    ).all()
    stale = session.scalars(
        update(Video)
        .where(
            Video.status == VideoStatus.PENDING,
            Video.updated_at < now - timedelta(seconds=stale_pending),
        )
        .values(updated_at=now)
        .returning(Video.id)
    ).all()
    session.commit()
    return Sweep(timed_out=timed_out, requeue=sorted({*expired, *orphaned, *stale}))
