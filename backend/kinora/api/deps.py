"""Request dependencies: settings, the database session, the hub, and who is asking."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session

from kinora.core.config import Settings, get_settings
from kinora.core.db import get_sessionmaker, session_scope
from kinora.core.models import User, Video
from kinora.core.tokens import Scope, is_scoped, scope_of
from kinora.jobs import accounts
from kinora.streaming.hub import StreamHub


def get_session() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


# The two below are `async def` though they never wait: FastAPI runs a plain function
# dependency in a worker thread, two thread hops per stream opened for a lookup each
# (bench.storm: a seventh of the API's CPU in a reconnect storm).
async def get_hub(request: Request) -> StreamHub:
    hub: StreamHub = request.app.state.progress.hub
    return hub


async def current_settings() -> Settings:
    return get_settings()


# Ids are 64-bit signed integers in the database: a larger one is a 422 that says so,
# never an overflow deep in the driver (a 500).
MAX_ID = 2**63 - 1
VideoId = Annotated[int, Path(ge=1, le=MAX_ID, description="The video's id")]

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(current_settings)]
HubDep = Annotated[StreamHub, Depends(get_hub)]

_bearer = HTTPBearer(auto_error=False, description="Your API token")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, parsed as HTTPBearer
    parses it for the HTTP routes (the WebSocket route reads the header itself)."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def user_by_token(session: Session, token: str) -> User:
    user = accounts.find_by_token(session, token)
    if user is None:
        raise unauthorized("invalid API token: check the token `kinora users create` printed")
    return user


def current_user(credentials: BearerDep) -> User:
    """The caller. Its own short session: a request never holds two pooled connections
    at once (twenty concurrent requests each waiting for a second connection from a
    pool they had exhausted would deadlock until the pool timeout)."""
    if credentials is None:
        raise unauthorized("missing API token: send the header `Authorization: Bearer <token>`")
    with session_scope() as session:
        user = user_by_token(session, credentials.credentials)
        session.expunge(user)
        return user


CurrentUser = Annotated[User, Depends(current_user)]


def not_found(video_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=f"video {video_id} not found")


def owned_video(session: Session, video_id: int, user_id: int) -> Video:
    """The video if it belongs to `user_id`; 404 otherwise (another user's video does
    not reveal that it exists)."""
    if not 1 <= video_id <= MAX_ID:  # the WebSocket route takes any int
        raise not_found(video_id)
    video = session.get(Video, video_id)
    if video is None or video.user_id != user_id:
        raise not_found(video_id)
    return video


def watcher_video(
    session: Session, video_id: int, header_token: str | None, query_token: str | None
) -> Video:
    """Authorize a stream or content request: an API token (header or `?token=`) or a
    token scoped to this one video (`?token=`), unless the user rotated their API token
    after it was signed (README, Faults: a URL signed before a revocation stops working)."""
    token = watcher_token(header_token, query_token)
    if not is_scoped(token):
        return owned_video(session, video_id, user_by_token(session, token).id)
    scope = scoped(token, video_id)
    video = owned_video(session, video_id, scope.user_id)
    if scope.issued_ms < video.user.revoked_before_ms:
        raise revoked_link()
    return video


def watcher_token(header_token: str | None, query_token: str | None) -> str:
    token = header_token or query_token
    if not token:
        raise unauthorized("missing token: send `Authorization: Bearer <token>` or `?token=`")
    return token


def scoped(token: str, video_id: int) -> Scope:
    """What a token scoped to `video_id` says (its signature: no database needed); 401
    when it is forged, expired, or for another video."""
    scope = scope_of(token, video_id)
    if scope is None:
        raise unauthorized("invalid or expired video token: fetch the video again for a new URL")
    return scope


def revoked_link() -> HTTPException:
    return unauthorized(
        "this video link was revoked (its owner's API token was rotated): "
        "fetch the video again for a new URL"
    )
