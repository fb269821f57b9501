"""API tokens (random, stored hashed) and scoped tokens (HMAC-signed, one video, expiring).

A scoped token lets `EventSource` and `<video>`, which cannot send headers, reach one
video's stream and content without ever putting the user's API token in a URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from kinora.core.config import get_settings

API_PREFIX = "kin_"
# kvs2.<video>.<user>.<issued, ms>.<expires, s>.<signature>: the issue time lets a
# revocation (the user's API token rotated) end every URL signed before it.
SCOPED_PREFIX = "kvs2"


def new_api_token() -> str:
    return API_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _signature(payload: str) -> str:
    key = get_settings().resolved_secret_key()
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign_scoped(video_id: int, user_id: int, ttl_seconds: int | None = None) -> str:
    ttl = get_settings().scoped_token_ttl_seconds if ttl_seconds is None else ttl_seconds
    payload = f"{SCOPED_PREFIX}.{video_id}.{user_id}.{now_ms()}.{int(time.time()) + ttl}"
    return f"{payload}.{_signature(payload)}"


def is_scoped(token: str) -> bool:
    return token.startswith(SCOPED_PREFIX + ".")


@dataclass(frozen=True)
class Scope:
    """What a genuine, unexpired scoped token says: whose it is, and its lifetime."""

    user_id: int
    issued_ms: int  # when it was signed (revoked if the user's tokens were after it)
    expires: int  # epoch seconds


def scope_of(token: str, video_id: int) -> Scope | None:
    """What the token says, if it is genuine, unexpired and for `video_id`; else None.
    Whether it was revoked since is the database's to say (User.tokens_valid_after)."""
    parts = token.split(".")
    if len(parts) != 6 or parts[0] != SCOPED_PREFIX:
        return None
    payload, signature = ".".join(parts[:5]), parts[5]
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if not hmac.compare_digest(signature.encode(), _signature(payload).encode()):
        return None
    try:
        token_video, user_id, issued, expires = (int(p) for p in parts[1:5])
    except ValueError:
        return None
    if token_video != video_id or expires < time.time():
        return None
    return Scope(user_id, issued, expires)


def verify_scoped(token: str, video_id: int) -> int | None:
    """The user id the token was issued to, if it is genuine, unexpired and for
    `video_id`; else None."""
    scope = scope_of(token, video_id)
    return None if scope is None else scope.user_id
