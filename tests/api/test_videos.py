"""The videos API over HTTP: auth, credits, input errors, reading and listing."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import kombu.exceptions
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from kinora.api.app import create_app
from kinora.core.db import session_scope
from kinora.core.models import CreditEntry, CreditKind, User, Video, VideoStatus
from kinora.core.tokens import verify_scoped
from kinora.jobs import dispatch
from kinora.jobs.lifecycle import content_path
from tests.utils.accounts import Account, make_account
from tests.utils.clients import pending_video
from tests.utils.inprocess import InProcessApi

PROMPT = "A red kite flying over green hills"


def generate(app: InProcessApi, headers: dict[str, str], body: dict[str, Any]) -> Any:
    with app.client() as client:
        return client.post("/api/v1/videos/generate", json=body, headers=headers)


def test_missing_or_bad_token_is_401(app: InProcessApi) -> None:
    missing = generate(app, {}, {"prompt": PROMPT})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]

    bad = generate(app, {"Authorization": "Bearer kin_not-a-token"}, {"prompt": PROMPT})
    assert bad.status_code == 401


def test_free_plan_is_403_and_charged_nothing(app: InProcessApi, environment: object) -> None:
    free = make_account(plan="free", credits=1000)
    response = generate(app, free.headers, {"prompt": PROMPT})
    assert response.status_code == 403
    assert "pro plan" in response.json()["detail"]
    with session_scope() as session:
        assert session.get(User, free.id).credits == 1000  # type: ignore[union-attr]


def test_too_few_credits_is_402_and_creates_nothing(app: InProcessApi, environment: object) -> None:
    poor = make_account(credits=150)
    first = generate(app, poor.headers, {"prompt": PROMPT})
    assert first.status_code == 202
    assert first.json()["credits_remaining"] == 50

    second = generate(app, poor.headers, {"prompt": PROMPT})
    assert second.status_code == 402
    assert "costs 100 credits and you have 50" in second.json()["detail"]

    with session_scope() as session:
        videos = session.scalars(select(Video).where(Video.user_id == poor.id)).all()
        ledger = session.scalars(select(CreditEntry).where(CreditEntry.user_id == poor.id)).all()
    assert len(videos) == 1
    assert sorted((e.kind, e.amount) for e in ledger) == [
        (CreditKind.CHARGE, -100),
        (CreditKind.GRANT, 150),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "too short"}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": " " * 9 + "abcdefghi"}, "prompt"),
        ({"prompt": PROMPT + "\x00"}, "prompt"),
        ({"prompt": PROMPT, "seconds": 5}, "seconds"),
        ({"prompt": PROMPT, "size": "1920x1080"}, "size"),
        ({"prompt": PROMPT, "image_url": "ftp://example.com/a.png"}, "image_url"),
        ({"prompt": PROMPT, "image_url": "data:text/plain;base64,aGk="}, "image_url"),
        *(
            ({"prompt": PROMPT, "image_url": f"http://{host}:8000/inside.png"}, "image_url")
            for host in (
                "127.1",
                "2130706433",
                "0x7f000001",
                "[::ffff:127.0.0.1]",
                "[::1]",
                "localhost",
                "LOCALHOST",
                "0.0.0.0",
                "user@127.0.0.1",
                "10.0.0.8",
            )
        ),
        ({"prompt": PROMPT, "image_url": "http://example.com/" + "a" * 15 * 2**20}, "image_url"),
        ({"prompt": PROMPT, "image_url": "http://example.com/a\r\nb.png"}, "image_url"),
        ({"prompt": PROMPT, "duration": 4}, "duration"),
        ({}, "prompt"),
    ],
)
def test_invalid_body_is_422_naming_the_field(
    app: InProcessApi, account: Account, body: dict[str, Any], field: str
) -> None:
    response = generate(app, account.headers, body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"{field}: "), detail
    assert response.json()["errors"][0]["field"] == field


def test_unknown_and_foreign_videos_are_404_alike(app: InProcessApi, account: Account) -> None:
    other = make_account()
    theirs = pending_video(other)
    with app.client(account) as client:
        foreign = client.get(f"/api/v1/videos/{theirs}")
        unknown = client.get("/api/v1/videos/999999")
        stream = client.get(f"/api/v1/videos/{theirs}/stream")
        content = client.get(f"/api/v1/videos/{theirs}/content")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == {
        "detail": f"video {theirs} not found",
        "trace_id": foreign.headers["X-Trace-Id"],
    }
    assert stream.status_code == content.status_code == 404


def test_scoped_token_opens_only_its_own_video(app: InProcessApi, account: Account) -> None:
    created = generate(app, account.headers, {"prompt": PROMPT}).json()
    token = created["stream_url"].split("token=")[1]
    other = pending_video(account)
    with app.client() as client:
        own = client.get(f"/api/v1/videos/{created['video_id']}/content?token={token}")
        wrong = client.get(f"/api/v1/videos/{other}/content?token={token}")
        forged = client.get(f"/api/v1/videos/{created['video_id']}/content?token={token[:-2]}xx")
        # a scoped token is not an API token
        api = client.get(
            f"/api/v1/videos/{created['video_id']}", headers={"Authorization": f"Bearer {token}"}
        )
    assert own.status_code in (200, 409)  # authorized; 409 until completed
    assert wrong.status_code == 401
    assert forged.status_code == 401
    assert api.status_code == 401


def test_content_is_409_until_completed(app: InProcessApi, account: Account) -> None:
    video_id = pending_video(account)
    with app.client(account) as client:
        response = client.get(f"/api/v1/videos/{video_id}/content")
    assert response.status_code == 409
    assert "pending" in response.json()["detail"]


def test_list_is_newest_first_with_paging(app: InProcessApi, environment: object) -> None:
    owner = make_account()
    ids = [pending_video(owner, f"{PROMPT} number {i}") for i in range(3)]
    with app.client(owner) as client:
        page = client.get("/api/v1/videos", params={"limit": 2}).json()
        rest = client.get("/api/v1/videos", params={"limit": 2, "offset": 2}).json()
        bad = client.get("/api/v1/videos", params={"limit": 0})
    assert [v["id"] for v in page["videos"]] == ids[::-1][:2]
    assert [v["id"] for v in rest["videos"]] == ids[:1]
    assert page["total"] == 3
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("limit: ")


def test_many_concurrent_requests_do_not_exhaust_the_database_pool(
    app: InProcessApi, account: Account
) -> None:
    """Regression: auth and handler each took a pooled connection, so 20 requests at
    once deadlocked until the pool timed out."""
    video_id = pending_video(account)

    with app.client(account) as client:
        responses = client.at_once(40, "GET", f"/api/v1/videos/{video_id}")
    assert [r.status_code for r in responses] == [200] * 40


def test_health_and_readiness(app: InProcessApi) -> None:
    with app.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"database": "ok", "redis": "ok", "status": "ready"}


def test_twenty_concurrent_submits_with_one_idempotency_key_make_one_video(
    app: InProcessApi, environment: object
) -> None:
    owner = make_account(credits=1000)
    body = {"prompt": f"Idempotent lighthouse {owner.email}", "seconds": 4}
    headers = {**owner.headers, "Idempotency-Key": "retry-me-7"}

    with app.client() as client:
        responses = client.at_once(
            20, "POST", "/api/v1/videos/generate", json=body, headers=headers
        )

    assert [r.status_code for r in responses] == [202] * 20
    ids = {r.json()["video_id"] for r in responses}
    assert len(ids) == 1
    assert {r.json()["task_id"] for r in responses} == {responses[0].json()["task_id"]}
    assert {r.json()["credits_remaining"] for r in responses} == {900}
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
    with session_scope() as session:
        videos = session.scalars(select(Video).where(Video.user_id == owner.id)).all()
        charges = session.scalars(
            select(CreditEntry).where(
                CreditEntry.user_id == owner.id, CreditEntry.kind == CreditKind.CHARGE
            )
        ).all()
        assert session.get(User, owner.id).credits == 900  # type: ignore[union-attr]
    assert len(videos) == 1
    assert len(charges) == 1

    later = generate(app, headers, body)
    assert later.status_code == 202
    assert later.json()["video_id"] in ids

    other_body = generate(app, headers, {**body, "seconds": 8})
    assert other_body.status_code == 422
    assert "different request body" in other_body.json()["detail"]

    # keys belong to their user: another user's same key is another request
    stranger = make_account()
    theirs = generate(app, {**stranger.headers, "Idempotency-Key": "retry-me-7"}, body)
    assert theirs.status_code == 202
    assert theirs.json()["video_id"] not in ids


def test_an_oversized_idempotency_key_is_422(app: InProcessApi, account: Account) -> None:
    response = generate(app, {**account.headers, "Idempotency-Key": "k" * 300}, {"prompt": PROMPT})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("Idempotency-Key: ")


def test_get_gives_the_complete_events_video_url_made_absolute(
    app: InProcessApi, account: Account
) -> None:
    """One builder for the content URL (jobs.lifecycle.content_path): the `complete`
    event carries the path, GET the same path on the host the client used."""
    video_id = pending_video(account)
    with session_scope() as session:
        session.execute(
            update(Video).where(Video.id == video_id).values(status=VideoStatus.COMPLETED)
        )
    event_url = urlsplit(content_path(video_id, account.id))
    with app.client(account) as client:
        video = client.get(f"/api/v1/videos/{video_id}").json()
    got = urlsplit(video["video_url"])
    assert (got.scheme, got.netloc) == ("http", "kinora.test")
    assert got.path == event_url.path == f"/api/v1/videos/{video_id}/content"
    assert verify_scoped(parse_qs(got.query)["token"][0], video_id) == account.id
    assert urlsplit(video["thumbnail_url"]).path == f"/api/v1/videos/{video_id}/thumbnail"


def test_the_openapi_document_describes_the_stream(app: InProcessApi) -> None:
    """/docs is drawn from it (regression: the SSE response's signature once broke it)."""
    with app.client() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    stream = response.json()["paths"]["/api/v1/videos/{video_id}/stream"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]


def test_a_bug_while_queuing_is_a_500_with_its_trace_not_a_refunded_outage(
    environment: object, account: Account, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Errors keep their meaning: a broker that is unreachable is a 503 and a refund; a
    bug (here injected into the queuing call) is a 500 with its trace id and a log
    line, and the video stays charged and pending, for the sweeper to queue again."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("a bug in the queuing code")

    monkeypatch.setattr(dispatch, "generate_video", broken)
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        response = client.post(
            "/api/v1/videos/generate", json={"prompt": PROMPT}, headers=account.headers
        )
    assert response.status_code == 500, response.text
    assert response.json()["trace_id"]
    assert "unreachable" not in response.text
    assert "a bug in the queuing code" in caplog.text
    with session_scope() as session:
        video = session.scalars(select(Video).where(Video.user_id == account.id)).one()
        assert video.status == VideoStatus.PENDING
        user = session.get(User, account.id)
        assert user is not None
        assert user.credits == 900


def test_an_unreachable_broker_is_a_503_and_a_refund(
    environment: object, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise kombu.exceptions.OperationalError("Error 111 connecting to the broker")

    monkeypatch.setattr(dispatch, "generate_video", unreachable)
    with TestClient(create_app()) as client:
        response = client.post(
            "/api/v1/videos/generate", json={"prompt": PROMPT}, headers=account.headers
        )
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    with session_scope() as session:
        user = session.get(User, account.id)
        assert user is not None
        assert user.credits == 1000
