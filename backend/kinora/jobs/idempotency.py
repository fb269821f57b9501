"""`Idempotency-Key` on submit (README, Try it with curl, after the IETF Idempotency-Key draft).

The key is reserved by an INSERT in the very transaction that charges the user and
creates the video, against a unique (user, key) constraint: of any number of
requests with one key, at once or later, exactly one commits a video; the others
fail that INSERT (after waiting for the first to commit) and replay its response.
A key used with another body is a 422; keys are forgotten after 24 h.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kinora.core.models import IdempotencyKey, Video, utcnow

KEY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255


class KeyTaken(Exception):
    """Another request holds (or held) this key: replay its response."""


class KeyReused(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request body: "
            "use a new key for a new request"
        )


@dataclass(frozen=True)
class Replay:
    video_id: int
    task_id: str
    credits_remaining: int


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def reserve(session: Session, user_id: int, key: str, digest: str) -> IdempotencyKey:
    """Claim `key` in the caller's transaction; raises KeyTaken (rolled back) if it is
    someone else's."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at < utcnow() - KEY_TTL,
        )
    )
    row = IdempotencyKey(user_id=user_id, key=key, request_hash=digest)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise KeyTaken(key) from None
    return row


def forget(session: Session, video_id: int) -> None:
    """Free the key of a video that was never queued, so a retry with it can succeed."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.video_id == video_id))


def lookup(session: Session, user_id: int, key: str, digest: str) -> Replay | None:
    """The stored response for `key`, if a request with it has committed (and the key
    has not expired); KeyReused if that request had another body. Read before the rate
    limit, so a client's retry is answered and never counted (README, Faults)."""
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at >= utcnow() - KEY_TTL,
        )
    )
    if row is None or row.video_id is None:
        return None
    if row.request_hash != digest:
        raise KeyReused(key)
    video = session.get(Video, row.video_id)
    assert video is not None
    return Replay(video.id, video.task_id, row.credits_remaining)


def replay(session: Session, user_id: int, key: str, digest: str) -> Replay:
    """The response of the request that holds `key`."""
    row = session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
    )
    if row is None or row.video_id is None:
        raise KeyTaken(key)  # expired and deleted between the two statements: rare
    if row.request_hash != digest:
        raise KeyReused(key)
    video = session.get(Video, row.video_id)
    assert video is not None
    return Replay(video.id, video.task_id, row.credits_remaining)
