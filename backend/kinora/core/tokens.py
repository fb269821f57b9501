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

from kinora.core.config import get_settings

API_PREFIX = "kin_"
SCOPED_PREFIX = "kvs1"


def new_api_token() -> str:
    return API_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _signature(payload: str) -> str:
    key = get_settings().resolved_secret_key()
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_scoped(video_id: int, user_id: int, ttl_seconds: int | None = None) -> str:
    ttl = get_settings().scoped_token_ttl_seconds if ttl_seconds is None else ttl_seconds
    payload = f"{SCOPED_PREFIX}.{video_id}.{user_id}.{int(time.time()) + ttl}"
    return f"{payload}.{_signature(payload)}"


def is_scoped(token: str) -> bool:
    return token.startswith(SCOPED_PREFIX + ".")


def verify_scoped(token: str, video_id: int) -> int | None:
    """The user id the token was issued to, if it is genuine, unexpired and for
    `video_id`; else None."""
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != SCOPED_PREFIX:
        return None
    payload, signature = ".".join(parts[:4]), parts[4]
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    if not hmac.compare_digest(signature.encode(), _signature(payload).encode()):
        return None
    try:
        token_video, user_id, expires = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if token_video != video_id or expires < time.time():
        return None
    return user_id
