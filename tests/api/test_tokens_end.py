"""Tokens end (README, How it works): an API token is revoked by rotating it (an endpoint and
a command); every URL signed before then stops working; every open stream opened with
what was revoked, or with a scoped token that expires, ends within seconds with a last
event that says why and no new `retry:` (a reconnect would only meet a 401); and a
replayed `complete` carries a `video_url` signed when it is sent."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import update
from websockets.sync.client import connect

from kinora.core.db import session_scope
from kinora.core.models import Video, VideoStatus
from kinora.core.tokens import scope_of, sign_scoped, verify_scoped
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account, make_account
from tests.utils.clients import close_code, events_of, pending_video, read_stream
from tests.utils.processes import start_api, stop, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def api(environment: dict[str, str], tmp_path: Path) -> Iterator[str]:
    # Pings far apart: the test's WebSocket client does not answer them.
    env = environment | {"WS_PING_SECONDS": "30", "WS_PONG_TIMEOUT_SECONDS": "60"}
    process, base = start_api(env, tmp_path / "api.log")
    yield base
    stop(process)


class Reader(threading.Thread):
    """Reads one SSE stream to its end (at most `limit` seconds), noting when it ended."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, limit: float = 30):
        super().__init__(daemon=True)
        self.url, self.headers, self.limit = url, headers or {}, limit
        self.lines: list[str] = []
        self.status = 0
        self.ended_at = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=15)) as client,
            client.stream("GET", self.url, headers=self.headers) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                self.lines.append(line)
                if time.monotonic() > deadline:
                    break
        self.ended_at = time.monotonic()

    def opened(self) -> bool:
        return any(line.startswith("retry:") for line in self.lines)


def started(reader: Reader) -> Reader:
    reader.start()
    deadline = time.monotonic() + 10
    while not reader.opened():
        assert time.monotonic() < deadline, f"the stream did not open: {reader.lines}"
        time.sleep(0.05)
    return reader


def test_a_rotated_token_revokes_its_urls_and_ends_its_streams(api: str) -> None:
    account = make_account()
    video = pending_video(account)
    with httpx.Client(base_url=api, timeout=10) as client:
        got = client.get(f"/api/v1/videos/{video}", headers=account.headers).json()
        shared = got["stream_url"]
        content = f"/api/v1/videos/{video}/content?token={sign_scoped(video, account.id)}"
        assert client.get(content).status_code == 409  # valid; the video is not done yet
        by_token = started(Reader(f"{api}/api/v1/videos/{video}/stream", account.headers))
        by_link = started(Reader(shared))
        ws_url = f"ws{api[4:]}/api/v1/projects/{video}/progress?token={account.token}"
        with connect(ws_url, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["event"] == "connected"
            rotated = client.post("/api/v1/token/rotate", headers=account.headers)
            at = time.monotonic()
            assert rotated.status_code == 200, rotated.text
            new = rotated.json()["token"]
            by_token.join(15)
            by_link.join(15)
            code = close_code(ws, within=10)
        assert client.get("/api/v1/videos", headers=account.headers).status_code == 401
        again = client.get("/api/v1/videos", headers={"Authorization": f"Bearer {new}"})
        assert again.status_code == 200
        refused = client.get(content)
        assert refused.status_code == 401
        assert "revoked" in refused.json()["detail"]
        assert client.get(shared).status_code == 401  # the shared link, signed before
        fresh = client.get(f"/api/v1/videos/{video}", headers={"Authorization": f"Bearer {new}"})
        assert scope_of(parse_qs(urlsplit(fresh.json()["stream_url"]).query)["token"][0], video)
    for reader in (by_token, by_link):
        assert not reader.is_alive()
        assert reader.ended_at - at < 6, "a revoked stream went on"
        last = events_of(reader.lines)[-1]
        assert last["code"] == "token_revoked", reader.lines
        assert "rotated" in last["message"]
        assert sum(line.startswith("retry:") for line in reader.lines) == 1  # no new retry:
    assert code == 4401


def test_a_stream_ends_when_its_scoped_token_expires(
    environment: dict[str, str], account: Account, tmp_path: Path
) -> None:
    env = environment | {"SCOPED_TOKEN_TTL_SECONDS": "3"}
    process, base = start_api(env, tmp_path / "api.log")
    try:
        video = pending_video(account)
        url = httpx.get(
            f"{base}/api/v1/videos/{video}", headers=account.headers, timeout=10
        ).json()["stream_url"]
        expires = scope_of(parse_qs(urlsplit(url).query)["token"][0], video)
        assert expires is not None
        reader = started(Reader(url))
        reader.join(15)
    finally:
        stop(process)
    assert not reader.is_alive()
    ended = time.time() - expires.expires
    assert -1 < ended < 3, f"ended {ended:.1f} s after the token expired"
    last = events_of(reader.lines)[-1]
    assert last["code"] == "token_expired"
    assert sum(line.startswith("retry:") for line in reader.lines) == 1


def test_a_replayed_complete_carries_a_video_url_signed_when_sent(
    stack: Any, account: Account
) -> None:
    """The history keeps a `complete` for 24 h; the token in its `video_url` lived an
    hour. Replayed now, its URL is signed now."""
    video = pending_video(account)
    stale = f"/api/v1/videos/{video}/content?token={sign_scoped(video, account.id, -10)}"
    with SSELogger(keys.video(video)) as log:
        log.complete(video_url=stale)
    with session_scope() as session:
        session.execute(update(Video).where(Video.id == video).values(status=VideoStatus.COMPLETED))
    status, lines = read_stream(
        f"{stack.base_url}/api/v1/videos/{video}/stream", headers=account.headers, timeout=20
    )
    assert status == 200
    (complete,) = events_of(lines)
    sent = urlsplit(complete["video_url"])
    assert sent.path == f"/api/v1/videos/{video}/content"
    assert verify_scoped(parse_qs(sent.query)["token"][0], video) == account.id
    assert verify_scoped(parse_qs(urlsplit(stale).query)["token"][0], video) is None


def test_kinora_users_rotate_token_prints_the_new_token_last(
    environment: dict[str, str], api: str
) -> None:
    account = make_account()
    result = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "rotate-token", account.email],
        env=environment, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    new = result.stdout.strip().splitlines()[-1]
    assert new.startswith("kin_")
    with httpx.Client(base_url=api, timeout=10) as client:
        assert client.get("/api/v1/videos", headers=account.headers).status_code == 401
        assert client.get("/api/v1/videos", headers={"Authorization": f"Bearer {new}"}).is_success
    missing = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "rotate-token", "nobody@test.kinora"],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "no user nobody@test.kinora" in missing.stderr


def stream_status(url: str, headers: dict[str, str]) -> int:
    """The status a stream opens with (the stream itself is let go at once)."""
    with httpx.Client(timeout=10) as client, client.stream("GET", url, headers=headers) as r:
        return r.status_code


def test_a_rotated_api_token_opens_no_stream_a_second_later(api: str) -> None:
    """A stream opened with the API token finds its owner without a database read of
    its own (one read a second, shared: api.recent); a rotated token is refused within
    that second or so all the same."""
    account = make_account()
    video = pending_video(account)
    url = f"{api}/api/v1/videos/{video}/stream"
    assert stream_status(url, account.headers) == 200
    rotated = httpx.post(f"{api}/api/v1/token/rotate", headers=account.headers, timeout=10)
    at = time.monotonic()
    assert rotated.status_code == 200, rotated.text
    wait_for("the old token refused", lambda: stream_status(url, account.headers) == 401, 5)
    assert time.monotonic() - at < 2.5
    new = {"Authorization": f"Bearer {rotated.json()['token']}"}
    assert stream_status(url, new) == 200
    other = make_account()  # a valid token of someone else: not their video
    assert stream_status(url, other.headers) == 404


def test_a_client_with_the_end_gets_a_204_whatever_the_database_said_a_moment_ago(
    api: str,
) -> None:
    """The video's row is read once a second for all the streams that open on it (the
    API token's and the scoped link's alike), so a client reconnecting just after the
    end may meet a row that does not say it yet (here: it never will, as when the
    worker's last database write is still to come); Redis's end says it: a 204, and
    EventSource stops."""
    account = make_account()
    video = pending_video(account)
    with SSELogger(keys.video(video)) as log:
        log.log("working")
        end = log.complete()
    assert end is not None
    url = f"{api}/api/v1/videos/{video}/stream"
    headers = {**account.headers, "Last-Event-ID": str(end)}
    assert stream_status(url, headers) == 204
    shared = f"{url}?token={sign_scoped(video, account.id)}"
    assert stream_status(shared, {"Last-Event-ID": str(end)}) == 204
