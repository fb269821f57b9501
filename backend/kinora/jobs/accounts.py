"""Creating users: a hashed API token, a plan, and the opening credit grant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kinora.core.db import session_scope
from kinora.core.models import Plan, User, utcnow
from kinora.core.tokens import hash_token, new_api_token
from kinora.jobs import store


class DuplicateUser(Exception):
    pass


def create_user(email: str, *, credits: int, plan: str | Plan) -> tuple[User, str]:
    """Create a user with `credits` (a ledger grant); returns it and its API token, which
    is shown once and stored only as a hash."""
    token = new_api_token()
    with session_scope() as session:
        if session.scalar(select(User.id).where(User.email == email)) is not None:
            raise DuplicateUser(f"a user {email} exists already: pick another email")
        user = User(email=email, token_hash=hash_token(token), credits=0, plan=Plan(plan))
        session.add(user)
        try:
            session.flush()
        except IntegrityError as exc:
            raise DuplicateUser(f"a user {email} exists already: pick another email") from exc
        if credits:
            store.grant(session, user, credits, reason="account opened")
        session.flush()
        session.refresh(user)
        session.expunge(user)
    return user, token


def find_by_token(session: Session, token: str) -> User | None:
    """The user whose API token this is (tokens are stored only as hashes)."""
    return session.scalar(select(User).where(User.token_hash == hash_token(token)))


def user_for_token(token: str) -> User | None:
    with session_scope() as session:
        user = find_by_token(session, token)
        if user is not None:
            session.expunge(user)
        return user


def rotate_token(email: str | None = None, *, user_id: int | None = None) -> str | None:
    """Give the user (by email or id) a new API token. The old one stops working at once;
    so does every scoped URL signed before now, and every open stream ends within
    seconds (api.grants). None if no such user."""
    token = new_api_token()
    with session_scope() as session:
        where = User.email == email if user_id is None else User.id == user_id
        user = session.scalar(select(User).where(where))
        if user is None:
            return None
        user.token_hash = hash_token(token)
        user.tokens_valid_after = utcnow()
    return token
