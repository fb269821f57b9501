"""Revoking an API token (README, How it works: "Tokens end"): rotate it. The old token stops
working at once, every video URL signed before now stops working, and every stream
opened with either ends within seconds, saying why (api.grants)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from kinora.api.deps import CurrentUser
from kinora.core.models import utcnow
from kinora.jobs.accounts import rotate_token

router = APIRouter(prefix="/api/v1/token", tags=["account"])


class RotatedToken(BaseModel):
    token: str
    revoked_before: datetime


@router.post("/rotate", responses={401: {"description": "missing or invalid token"}})
async def rotate(user: CurrentUser) -> RotatedToken:
    """A new API token for you; the one this request used is revoked, with every video
    URL signed before now and every stream opened with them (they end within
    seconds). Keep the new token: it is shown once."""
    now = utcnow()
    token = await run_in_threadpool(rotate_token, user_id=user.id)
    assert token is not None  # the caller was just found by their token
    return RotatedToken(token=token, revoked_before=now)
