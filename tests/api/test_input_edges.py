"""What no form would send (README, Faults, bad input): every answer is a 4xx whose JSON
has `detail` and a non-empty `trace_id`; never a 500, and an unexpected 500 quotes
its trace id too. A retried submit is answered before the rate limit."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kinora.api.app import create_app
from kinora.core.tokens import sign_scoped
from tests.utils.accounts import Account, make_account
from tests.utils.clients import pending_video

PROMPT = "A paper boat drifting down a rainy street"
TOO_BIG = str(2**63)  # one past the largest 64-bit id


def assert_clean_4xx(response: Any, what: str) -> None:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
    body = response.json()
    assert body["detail"], what
    assert body["trace_id"], what
    assert body["trace_id"] == response.headers["X-Trace-Id"], what


def test_crafted_ids_headers_tokens_and_prompts_get_a_4xx_with_a_trace_id(
    api: TestClient, account: Account
) -> None:
    video = pending_video(account)
    scoped = sign_scoped(video, account.id)
    anonymous = api.get(f"/api/v1/videos/{video}/stream", params={"token": scoped[:-1] + "\u00e9"})
    client = api
    client.headers.update(account.headers)
    cases: dict[str, Any] = {
        "non-ASCII scoped token": anonymous,
        "id past 2^63-1": client.get(f"/api/v1/videos/{TOO_BIG}"),
        "stream id past 2^63-1": client.get(f"/api/v1/videos/{TOO_BIG}/stream"),
        "cancel id past 2^63-1": client.post(f"/api/v1/videos/{TOO_BIG}/cancel"),
        "content id past 2^63-1": client.get(f"/api/v1/videos/{TOO_BIG}/content"),
        "connections id past 2^63-1": client.get(f"/api/v1/videos/{TOO_BIG}/connections"),
        "id zero": client.get("/api/v1/videos/0"),
        "negative id": client.get("/api/v1/videos/-5"),
        "offset past 2^63-1": client.get("/api/v1/videos", params={"offset": TOO_BIG}),
        "superscript Last-Event-ID": client.get(
            f"/api/v1/videos/{video}/stream",
            headers={b"Last-Event-ID": "\u00b2".encode("latin-1")},
        ),
        "Arabic-Indic Last-Event-ID": client.get(
            f"/api/v1/videos/{video}/stream", params={"last_event_id": "\u0661"}
        ),
        "malformed bearer": client.get(
            "/api/v1/videos",
            headers={b"Authorization": "Bearer \u00e9\u00e9".encode("latin-1")},
        ),
        "zero-width prompt": client.post("/api/v1/videos/generate", json={"prompt": "\u200b" * 40}),
        "bidi-mark prompt": client.post(
            "/api/v1/videos/generate", json={"prompt": "\u200e\u2060 \u3000" * 10 + "abc"}
        ),
        "GET on generate": client.get("/api/v1/videos/generate"),
    }
    for what, response in cases.items():
        assert_clean_4xx(response, what)
    assert cases["id past 2^63-1"].status_code == 422
    assert cases["superscript Last-Event-ID"].status_code == 400
    assert cases["non-ASCII scoped token"].status_code == 401
    assert cases["zero-width prompt"].status_code == 422
    assert "visible" in cases["zero-width prompt"].json()["detail"]
    assert cases["GET on generate"].status_code == 405
    assert cases["GET on generate"].headers["Allow"] == "POST"
    # Nothing was charged for the refused prompts.
    assert client.get("/api/v1/videos").json()["total"] == 1  # the pending one


def test_an_unexpected_error_is_a_500_that_quotes_its_trace_id() -> None:
    app: FastAPI = create_app()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("broken on purpose")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kinora.test") as c:
            return await c.get("/boom", headers={"X-Request-Id": "req-0123456789"})

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.json()["trace_id"] == "req-0123456789"
    assert "req-0123456789" in response.json()["detail"]
    assert response.headers["X-Trace-Id"] == "req-0123456789"


def test_a_retried_submit_is_replayed_before_the_rate_limit_and_never_counted(
    api: TestClient,
) -> None:
    # Credits for one video: the keyed submit makes it; the unkeyed ones after it are
    # 402s that still count against the limit of 30 a minute.
    user = make_account(credits=100)
    key = {"Idempotency-Key": "retry-after-a-burst"}
    client = api
    client.headers.update(user.headers)
    first = client.post("/api/v1/videos/generate", json={"prompt": PROMPT}, headers=key)
    assert first.status_code == 202, first.text
    burst = [
        client.post("/api/v1/videos/generate", json={"prompt": PROMPT}).status_code
        for _ in range(29)
    ]
    limited = client.post("/api/v1/videos/generate", json={"prompt": PROMPT})
    retries = [
        client.post("/api/v1/videos/generate", json={"prompt": PROMPT}, headers=key)
        for _ in range(5)
    ]
    other_body = client.post(
        "/api/v1/videos/generate", json={"prompt": PROMPT + " at night"}, headers=key
    )
    assert burst == [402] * 29
    assert limited.status_code == 429
    for retry in retries:
        assert retry.status_code == 202, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json()["video_id"] == first.json()["video_id"]
    assert other_body.status_code == 422
    assert "different request body" in other_body.json()["detail"]


def test_a_scoped_token_opens_only_its_own_video_of_its_own_user(
    api: TestClient, account: Account
) -> None:
    """The scoped path reads no user from the database (the signature says who): it
    still refuses another video, another user's video, and a video that is not there."""
    mine, theirs = pending_video(account), pending_video(make_account())
    cases = {
        "another video's token": (mine, sign_scoped(theirs, account.id), 401),
        "a token for another user's video": (theirs, sign_scoped(theirs, account.id), 404),
        "no such video": (10**9, sign_scoped(10**9, account.id), 404),
    }
    for what, (video, token, status) in cases.items():
        response = api.get(f"/api/v1/videos/{video}/stream", params={"token": token})
        assert response.status_code == status, (what, response.text)
        assert_clean_4xx(response, what)
