"""API tokens are stored only as hashes; scoped tokens are signed, bound to one video
and one user, and expire."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import select

from kinora.core.db import session_scope
from kinora.core.models import User
from kinora.core.tokens import sign_scoped, verify_scoped
from kinora.jobs.accounts import user_for_token
from tests.utils.accounts import Account
from tests.utils.processes import Stack


def test_the_database_holds_a_hash_never_the_token(account: Account) -> None:
    with session_scope() as session:
        user = session.scalar(select(User).where(User.id == account.id))
        assert user is not None
        stored = " ".join(str(getattr(user, c.key)) for c in User.__table__.columns)
    assert account.token not in stored
    assert len(user.token_hash) == 64  # sha256, hex
    found = user_for_token(account.token)
    assert found is not None
    assert found.id == account.id
    assert user_for_token(account.token + "x") is None


def test_a_scoped_token_opens_one_video_for_one_user_until_it_expires(
    environment: dict[str, str],
) -> None:
    token = sign_scoped(video_id=7, user_id=3)
    assert verify_scoped(token, 7) == 3
    assert verify_scoped(token, 8) is None  # another video
    prefix, video, user, issued, expires, signature = token.split(".")
    assert int(expires) == pytest.approx(time.time() + 3600, abs=5)  # 1 h by default
    assert int(issued) == pytest.approx(time.time() * 1000, abs=5000)
    assert verify_scoped(".".join([prefix, video, "4", issued, expires, signature]), 7) is None
    later = str(int(expires) + 3600)
    assert verify_scoped(".".join([prefix, video, user, issued, later, signature]), 7) is None
    newer = str(int(issued) + 60_000)  # as if signed after a revocation
    assert verify_scoped(".".join([prefix, video, user, newer, expires, signature]), 7) is None
    assert verify_scoped(sign_scoped(7, 3, ttl_seconds=-1), 7) is None  # expired


@pytest.mark.slow
def test_an_expired_stream_url_is_401_and_says_what_to_do(stack: Stack, account: Account) -> None:
    from tests.utils.clients import pending_video

    video = pending_video(account)
    expired = sign_scoped(video, account.id, ttl_seconds=-1)
    response = httpx.get(
        f"{stack.base_url}/api/v1/videos/{video}/stream?token={expired}", timeout=10
    )
    assert response.status_code == 401
    assert "fetch the video again" in response.json()["detail"]
